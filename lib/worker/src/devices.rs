//! A user's devices: the capped registry in `users`, and eviction.
//!
//! A device not registered yet is admitted under the cap: idle devices and,
//! past the cap, the least recently seen are evicted; at most
//! `new_per_hour` new devices an hour per user (`rate_limited` past it). An evicted device's
//! place is forgotten (a delete marker in `CHAT_PLACES`, which no late save
//! writes over) and every open connection of it, on any edge, is closed
//! (4410). The registry is changed with compare-and-set, so concurrent
//! sessions of one user never admit past the cap.

use chat_domain::{DeviceId, UserId, now_millis};

use crate::{State, WorkerError};

/// Compare-and-set attempts at registering a device.
const REGISTER_ATTEMPTS: usize = 8;
/// The window in which a user's new devices are counted (ms).
const NEW_DEVICES_WINDOW: i64 = 3_600_000;
/// How exact a device's last-seen time is: a session of a device seen
/// less long ago than this writes nothing (eviction picks the least
/// recently seen device and forgets devices idle for days).
const SEEN_PRECISION: std::time::Duration = std::time::Duration::from_secs(300);

fn busy(why: &str) -> WorkerError {
    WorkerError::Store(chat_store::StoreError::Unavailable(why.into()))
}

/// Registers `device` of `user` as seen now; whether it was registered
/// before.
pub(crate) async fn register(
    state: &State,
    user: &UserId,
    device: &DeviceId,
    display_name: Option<&str>,
) -> Result<bool, WorkerError> {
    let users = &state.store.users;
    let limits = &state.config.devices;
    for _ in 0..REGISTER_ATTEMPTS {
        let now = now_millis();
        // one read decides: a known device seen lately with the same name
        // costs nothing more, one seen longer ago a write, a new one the
        // admission's write (a connection storm of new users was a write
        // that matched nothing, then the read and the write)
        let read = users.device_list(user).await?;
        if let Some(known) = read.devices.iter().find(|d| d.id == *device) {
            let lately = now - known.last_seen < SEEN_PRECISION.as_millis() as i64;
            let same_name = display_name.is_none_or(|n| Some(n) == read.display_name.as_deref());
            if (lately && same_name) || users.seen(user, display_name, device, now).await? {
                return Ok(true);
            }
            // evicted meanwhile: admitted again below, on a fresh read
            continue;
        }
        // a budget of new devices: a user churning through device ids
        // would fill CHAT_PLACES with keys and delete markers
        let admitted = read
            .one_more(now, NEW_DEVICES_WINDOW, limits.new_per_hour)
            .map_err(|next| {
                let secs = (next - now).max(1000) / 1000;
                WorkerError::RateLimited(format!(
                    "more than {} new devices within an hour: connect with a device id used before, or retry in {secs} s",
                    limits.new_per_hour
                ))
            })?;
        let idle_before = now - limits.idle.as_millis() as i64;
        let admission = read.admit(device, now, limits.max_per_user, idle_before);
        // evicted only once the registry says so: a compare-and-set that
        // lost (the list changed meanwhile) evicts no one
        if users
            .replace_devices(user, &read, &admission.keep, admitted, display_name, now)
            .await?
        {
            for old in &admission.evicted {
                if let Err(e) = evict(state, user, old).await {
                    // registered no more: a reconnect registers it anew
                    tracing::warn!(user = %user, device = %old, error = %e, "an evicted device's place could not be forgotten");
                }
            }
            return Ok(false);
        }
    }
    Err(busy("too many concurrent sessions of this user; retry"))
}

/// Forgets `device`'s place and closes its connections.
async fn evict(state: &State, user: &UserId, device: &DeviceId) -> Result<(), WorkerError> {
    state.places.forget(user, device).await?;
    if let Err(e) = state.bus.drop_previous_consumers(user, device).await {
        tracing::warn!(user = %user, device = %device, error = %e, "cannot delete an evicted device's consumers of the previous release; they expire when idle");
    }
    if let Err(e) = state.bus.announce_eviction(user, device).await {
        // its connections stop saving at once (the place is forgotten) and
        // end with their next reconnect
        tracing::warn!(user = %user, device = %device, error = %e, "cannot tell the edges of an evicted device");
    }
    tracing::info!(user = %user, device = %device, "device evicted");
    Ok(())
}
