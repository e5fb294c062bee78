//! The `users` collection: `UserProfile` (seed §4), refreshed from token
//! claims, plus the registry of the devices that hold a place in the
//! streams.
//!
//! The registry is capped; a new device beyond the cap evicts the least
//! recently seen one, whose place the worker forgets first. New devices
//! are also counted per window of time (`newDevices {s, n}`), so that a
//! user cannot churn through device ids: each costs a key in nats-server's
//! memory for its place, and an eviction a delete marker.

use chat_domain::{DeviceId, Millis, UserId};
use mongodb::{
    Collection,
    bson::{Bson, Document, doc},
    error::{ErrorKind, WriteFailure},
};

use crate::{StoreError, to_bson_time};

/// User profiles and device registries in MongoDB.
#[derive(Debug, Clone)]
pub struct UserRepo {
    coll: Collection<Document>,
}

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub last_seen: Millis,
}

/// A user's registered devices as read, with the revision a replacement
/// must still find.
#[derive(Debug, Clone, Default)]
pub struct DeviceList {
    pub devices: Vec<Device>,
    /// The profile's display name, if any.
    pub display_name: Option<String>,
    /// New devices admitted in the current window: (its start, how many).
    pub admitted: (Millis, u32),
    /// `None`: no user document yet.
    rev: Option<i64>,
}

/// What admitting a new device does to a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The registry afterwards, the new device last.
    pub keep: Vec<Device>,
    /// Devices to forget: idle past the threshold, or the least recently
    /// seen beyond the cap.
    pub evicted: Vec<DeviceId>,
}

impl DeviceList {
    /// The count of new devices once one more is admitted at `now`, in
    /// windows of `window` ms of which each admits `most`: `Err` with when
    /// (ms since the epoch) the next one may come if this window is full.
    pub fn one_more(
        &self,
        now: Millis,
        window: Millis,
        most: u32,
    ) -> Result<(Millis, u32), Millis> {
        let (since, n) = self.admitted;
        // a window that has ended, or one "started" in the future (a clock
        // set back): a new window from now
        if now >= since.saturating_add(window) || since > now {
            return Ok((now, 1));
        }
        if n >= most {
            return Err(since.saturating_add(window));
        }
        Ok((since, n + 1))
    }

    /// Admits `device` (not yet registered) at `now`: devices idle since
    /// before `idle_before` are evicted, then the least recently seen until
    /// there is room under `max`.
    pub fn admit(
        &self,
        device: &DeviceId,
        now: Millis,
        max: usize,
        idle_before: Millis,
    ) -> Admission {
        let (mut keep, idle): (Vec<Device>, Vec<Device>) = self
            .devices
            .iter()
            .filter(|d| d.id != *device)
            .cloned()
            .partition(|d| d.last_seen >= idle_before);
        let mut evicted: Vec<DeviceId> = idle.into_iter().map(|d| d.id).collect();
        keep.sort_by_key(|d| d.last_seen);
        let over = (keep.len() + 1).saturating_sub(max.max(1));
        evicted.extend(keep.drain(..over).map(|d| d.id));
        keep.push(Device {
            id: device.clone(),
            last_seen: now,
        });
        Admission { keep, evicted }
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
        || matches!(&*e.kind, ErrorKind::InsertMany(i)
            if i.write_errors.as_ref().is_some_and(|w| w.iter().any(|w| w.code == 11000)))
}

impl UserRepo {
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        Self {
            coll: db.collection("users"),
        }
    }

    fn profile(display_name: Option<&str>, now: Millis) -> Document {
        let now = to_bson_time(now);
        let mut set = doc! { "updatedAt": now, "lastSeenAt": now };
        if let Some(name) = display_name {
            set.insert("displayName", name);
        }
        set
    }

    /// Refreshes `user`'s profile and `device`'s last-seen time if the
    /// device is registered; returns whether it was.
    pub async fn seen(
        &self,
        user: &UserId,
        display_name: Option<&str>,
        device: &DeviceId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut set = Self::profile(display_name, now);
        set.insert("devices.$.lastSeenAt", to_bson_time(now));
        let res = self
            .coll
            .update_one(
                doc! { "_id": user.as_str(), "devices.id": device.as_str() },
                doc! { "$set": set },
            )
            .await?;
        Ok(res.matched_count == 1)
    }

    /// The devices `user` has registered.
    pub async fn device_list(&self, user: &UserId) -> Result<DeviceList, StoreError> {
        let Some(doc) = self.coll.find_one(doc! { "_id": user.as_str() }).await? else {
            return Ok(DeviceList::default());
        };
        let rev = match doc.get("devRev") {
            Some(Bson::Int64(r)) => *r,
            Some(Bson::Int32(r)) => i64::from(*r),
            _ => 0,
        };
        let devices = doc
            .get_array("devices")
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|d| {
                let d = d.as_document()?;
                Some(Device {
                    id: DeviceId::parse(d.get_str("id").ok()?).ok()?,
                    last_seen: d
                        .get_datetime("lastSeenAt")
                        .map(|t| t.timestamp_millis())
                        .unwrap_or_default(),
                })
            })
            .collect();
        let admitted = doc
            .get_document("newDevices")
            .map(|a| {
                let since = a.get_i64("s").unwrap_or_default();
                let n = a.get_i64("n").unwrap_or_default();
                (since, u32::try_from(n).unwrap_or(u32::MAX))
            })
            .unwrap_or_default();
        Ok(DeviceList {
            devices,
            display_name: doc.get_str("displayName").ok().map(str::to_owned),
            admitted,
            rev: Some(rev),
        })
    }

    /// The devices `user` has registered, by id.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<DeviceId>, StoreError> {
        Ok(self
            .device_list(user)
            .await?
            .devices
            .into_iter()
            .map(|d| d.id)
            .collect())
    }

    /// Replaces `user`'s registry with `devices`, and its count of new
    /// devices with `admitted` ([`DeviceList::one_more`]), if it is still
    /// as `read` found it (compare-and-set); returns whether it was.
    pub async fn replace_devices(
        &self,
        user: &UserId,
        read: &DeviceList,
        devices: &[Device],
        admitted: (Millis, u32),
        display_name: Option<&str>,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let list: Vec<Document> = devices
            .iter()
            .map(|d| doc! { "id": d.id.as_str(), "lastSeenAt": to_bson_time(d.last_seen) })
            .collect();
        let mut set = Self::profile(display_name, now);
        set.insert("devices", list);
        set.insert(
            "newDevices",
            doc! { "s": admitted.0, "n": i64::from(admitted.1) },
        );
        match read.rev {
            None => {
                set.insert("_id", user.as_str());
                set.insert("createdAt", to_bson_time(now));
                set.insert("devRev", 1_i64);
                match self.coll.insert_one(set).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_duplicate_key(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Some(rev) => {
                let same_rev = if rev == 0 {
                    doc! { "$in": [0_i64, Bson::Null] }
                } else {
                    doc! { "$eq": rev }
                };
                set.insert("devRev", rev + 1);
                let res = self
                    .coll
                    .update_one(
                        doc! { "_id": user.as_str(), "devRev": same_rev },
                        doc! { "$set": set },
                    )
                    .await?;
                Ok(res.matched_count == 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(devices: &[(&str, Millis)]) -> DeviceList {
        DeviceList {
            devices: devices
                .iter()
                .map(|(id, t)| Device {
                    id: DeviceId::parse(*id).expect("id"),
                    last_seen: *t,
                })
                .collect(),
            display_name: None,
            admitted: (0, 0),
            rev: Some(3),
        }
    }

    fn names(ids: &[DeviceId]) -> Vec<&str> {
        ids.iter().map(DeviceId::as_str).collect()
    }

    #[test]
    fn new_devices_are_counted_per_window() {
        const HOUR: Millis = 3_600_000;
        let mut read = list(&[]);
        let now = 1_796_342_400_000;
        // the first opens a window
        assert_eq!(read.one_more(now, HOUR, 3), Ok((now, 1)));
        read.admitted = (now, 1);
        assert_eq!(read.one_more(now + 10, HOUR, 3), Ok((now, 2)));
        read.admitted = (now, 3);
        // full: the next may come when the window ends
        assert_eq!(read.one_more(now + 10, HOUR, 3), Err(now + HOUR));
        assert_eq!(read.one_more(now + HOUR - 1, HOUR, 3), Err(now + HOUR));
        // a new window then
        assert_eq!(read.one_more(now + HOUR, HOUR, 3), Ok((now + HOUR, 1)));
        // a window that starts in the future (a clock set back) starts over
        assert_eq!(read.one_more(now - 5, HOUR, 3), Ok((now - 5, 1)));
    }

    #[test]
    fn a_new_device_under_the_cap_evicts_nothing() {
        let a = list(&[("a", 10), ("b", 20)]).admit(&DeviceId::parse("c").expect("id"), 30, 3, 0);
        assert!(a.evicted.is_empty());
        assert_eq!(a.keep.len(), 3);
        assert_eq!(a.keep[2].id.as_str(), "c");
    }

    #[test]
    fn at_the_cap_the_least_recently_seen_goes() {
        let a = list(&[("a", 20), ("b", 10), ("c", 30)]).admit(
            &DeviceId::parse("d").expect("id"),
            40,
            3,
            0,
        );
        assert_eq!(names(&a.evicted), ["b"]);
        let kept: Vec<_> = a.keep.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["a", "c", "d"]);
    }

    #[test]
    fn idle_devices_go_first_and_the_cap_holds_after_a_lowered_limit() {
        let a = list(&[("a", 5), ("b", 50), ("c", 60), ("d", 70)]).admit(
            &DeviceId::parse("e").expect("id"),
            80,
            2,
            10,
        );
        assert_eq!(names(&a.evicted), ["a", "b", "c"]);
        assert_eq!(a.keep.len(), 2);
    }
}
