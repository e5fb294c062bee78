//! A user's devices and what their group consumers filter on.
//!
//! Every change to the groups a user's devices follow (session open,
//! subscribe, leave, removal) runs under the user's filter lease, taken in
//! MongoDB, so two workers never interleave a read of the subscriptions
//! with a write of stale filters: the last write always reflects the last
//! change. A removal also narrows the filters before the membership change
//! commits, so nothing the group publishes after the removal reaches any
//! device of the removed user.
//!
//! A lease is given back however its holder ends (dropped on a cancelled
//! call, it is released by a task of its own), and its holder writes no
//! filter past half its lifetime, so a slow holder can never write after
//! another worker took the lease over.

use std::time::Duration;

use chat_domain::{DeviceId, GroupId, UserId, now_millis};

use crate::{State, WorkerError};

/// How long a lease holds unless given back: longer than the slowest sync
/// (each consumer call has a 5 s deadline) over a capped device list.
const LEASE: Duration = Duration::from_secs(60);
/// How long a caller waits for another worker's lease on the same user.
const LEASE_WAIT: Duration = Duration::from_secs(8);
/// Compare-and-set attempts at registering a device.
const REGISTER_ATTEMPTS: usize = 8;

fn busy(why: &str) -> WorkerError {
    WorkerError::Store(chat_store::StoreError::Unavailable(why.into()))
}

/// The user's filter lease, held until [`Lease::release`] or dropped.
pub(crate) struct Lease<'a> {
    state: &'a State,
    user: UserId,
    holder: String,
    /// No filter is written after this: the lease still has half its
    /// lifetime then, so no other worker can hold it yet.
    write_until: tokio::time::Instant,
    released: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // a call cancelled while holding it: give it back all the same
        let users = self.state.store.users.clone();
        let (user, holder) = (self.user.clone(), std::mem::take(&mut self.holder));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = users.release_filter_lease(&user, &holder).await {
                    tracing::warn!(user = %user, error = %e, "cannot release a dropped filter lease; it runs out by itself");
                }
            });
        }
    }
}

impl<'a> Lease<'a> {
    /// Waits (bounded) for `user`'s lease.
    pub(crate) async fn take(state: &'a State, user: &UserId) -> Result<Self, WorkerError> {
        let holder = uuid::Uuid::new_v4().simple().to_string();
        let asked = tokio::time::Instant::now();
        let deadline = asked + LEASE_WAIT;
        let mut wait = Duration::from_millis(5);
        loop {
            let now = now_millis();
            let until = now + LEASE.as_millis() as i64;
            if state
                .store
                .users
                .take_filter_lease(user, &holder, now, until)
                .await?
            {
                return Ok(Self {
                    state,
                    user: user.clone(),
                    holder,
                    // from before the ask: the stored `until` is later
                    write_until: asked + LEASE / 2,
                    released: false,
                });
            }
            if tokio::time::Instant::now() + wait > deadline {
                return Err(busy("this user's devices are being changed; retry"));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Fails once the lease is too old to write under.
    pub(crate) fn check_fresh(&self) -> Result<(), WorkerError> {
        if tokio::time::Instant::now() > self.write_until {
            return Err(busy("changing this user's devices took too long; retry"));
        }
        Ok(())
    }

    /// Points every device of the user at `groups`.
    pub(crate) async fn set_filters(&self, groups: &[GroupId]) -> Result<(), WorkerError> {
        let s = self.state;
        for device in s.store.users.devices(&self.user).await? {
            self.check_fresh()?;
            s.bus.set_group_filters(&self.user, &device, groups).await?;
        }
        Ok(())
    }

    /// The groups the user subscribed to (and is a member of), less `except`.
    pub(crate) async fn subscribed(
        &self,
        except: Option<&GroupId>,
    ) -> Result<Vec<GroupId>, WorkerError> {
        let mut groups = self
            .state
            .store
            .groups
            .subscribed_groups(&self.user)
            .await?;
        groups.retain(|g| Some(g) != except);
        Ok(groups)
    }

    /// Points every device of the user at the groups it subscribed to.
    pub(crate) async fn sync(&self) -> Result<(), WorkerError> {
        let groups = self.subscribed(None).await?;
        self.set_filters(&groups).await
    }

    /// Registers `device` as seen now. A device not registered yet is
    /// admitted under the cap: idle devices and, past the cap, the least
    /// recently seen are evicted, their consumers deleted before the
    /// registry forgets them. Under the lease, so no session of an evicted
    /// device can make consumers again behind the registry's back, which is
    /// what removals walk.
    pub(crate) async fn register(
        &self,
        device: &DeviceId,
        display_name: Option<&str>,
    ) -> Result<(), WorkerError> {
        let (state, user) = (self.state, &self.user);
        let users = &state.store.users;
        let limits = &state.config.devices;
        for _ in 0..REGISTER_ATTEMPTS {
            let now = now_millis();
            if users.seen(user, display_name, device, now).await? {
                return Ok(());
            }
            let read = users.device_list(user).await?;
            let idle_before = now - limits.idle.as_millis() as i64;
            let admission = read.admit(device, now, limits.max_per_user, idle_before);
            for old in &admission.evicted {
                self.check_fresh()?;
                state.bus.delete_device(user, old).await?;
                tracing::info!(user = %user, device = %old, "device evicted");
            }
            if users
                .replace_devices(user, &read, &admission.keep, display_name, now)
                .await?
            {
                return Ok(());
            }
        }
        Err(busy("too many concurrent sessions of this user; retry"))
    }

    /// Gives the lease back (a lease not given back runs out by itself).
    pub(crate) async fn release(mut self) {
        self.released = true;
        if let Err(e) = self
            .state
            .store
            .users
            .release_filter_lease(&self.user, &self.holder)
            .await
        {
            tracing::warn!(user = %self.user, error = %e, "cannot release a filter lease; it runs out by itself");
        }
    }
}
