//! The `users` collection: `UserProfile` (seed §4), refreshed from token
//! claims, plus the devices that hold a delivery position.

use chat_domain::{DeviceId, Millis, UserId};
use mongodb::{
    Collection,
    bson::{Document, doc},
};

use crate::{StoreError, to_bson_time};

/// The most devices remembered per user; the oldest are forgotten first (their
/// JetStream consumers expire by themselves after the inactivity threshold).
pub const MAX_DEVICES: i32 = 32;

/// User profiles in MongoDB.
#[derive(Debug, Clone)]
pub struct UserRepo {
    coll: Collection<Document>,
}

impl UserRepo {
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        Self {
            coll: db.collection("users"),
        }
    }

    /// Creates or refreshes `user`'s profile and records `device` as seen now.
    pub async fn touch(
        &self,
        user: &UserId,
        display_name: Option<&str>,
        device: &DeviceId,
        now: Millis,
    ) -> Result<(), StoreError> {
        let now = to_bson_time(now);
        let mut set = doc! { "updatedAt": now, "lastSeenAt": now };
        if let Some(name) = display_name {
            set.insert("displayName", name);
        }
        // two steps: drop the device's old entry, then push it to the end,
        // keeping the newest MAX_DEVICES
        self.coll
            .update_one(
                doc! { "_id": user.as_str() },
                doc! {
                    "$set": set,
                    "$setOnInsert": { "createdAt": now },
                    "$pull": { "devices": { "id": device.as_str() } },
                },
            )
            .upsert(true)
            .await?;
        self.coll
            .update_one(
                doc! { "_id": user.as_str() },
                doc! { "$push": { "devices": {
                    "$each": [ { "id": device.as_str(), "lastSeenAt": now } ],
                    "$slice": -MAX_DEVICES,
                } } },
            )
            .await?;
        Ok(())
    }

    /// The devices `user` has connected from.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<DeviceId>, StoreError> {
        let Some(doc) = self.coll.find_one(doc! { "_id": user.as_str() }).await? else {
            return Ok(Vec::new());
        };
        let Ok(devices) = doc.get_array("devices") else {
            return Ok(Vec::new());
        };
        Ok(devices
            .iter()
            .filter_map(|d| d.as_document()?.get_str("id").ok())
            .filter_map(|id| DeviceId::parse(id).ok())
            .collect())
    }
}
