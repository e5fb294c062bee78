//! MongoDB: the system of record for groups and user profiles.
//!
//! Documents are plain serde structs private to this crate; the public API
//! speaks domain types only. Indexes are created at start-up, idempotently.

use std::time::Duration;

use mongodb::{Client, Database, options::ClientOptions};

mod batch;
mod blocks;
mod groups;
mod mentions;
mod messages;
mod mutes;
mod objects;
mod presign;
mod reactions;
mod uploads;
mod users;

pub use blocks::{BlockRepo, Blocked};
pub use groups::{GroupRecord, GroupRepo, Membership, Tombstone, Unnotified};
pub use mentions::{Mention, MentionCursor, MentionRepo};
pub use messages::{MessageRepo, Receipt, Resealed, StoredMessage};
pub use mutes::{FOREVER as MUTED_FOREVER, MuteRepo};
pub use objects::{ObjectInfo, Objects, ObjectsConfig};
pub use reactions::{Reacted, ReactionLimit, ReactionRepo, Reactions};
pub use uploads::{Upload, UploadRepo};
pub use users::{Admission, Device, DeviceList, UserRepo};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Database(String),
    /// A stored document does not decode to a valid domain value.
    #[error("corrupt document {id}: {message}")]
    Corrupt { id: String, message: String },
}

impl From<mongodb::error::Error> for StoreError {
    fn from(e: mongodb::error::Error) -> Self {
        use mongodb::error::ErrorKind;
        match *e.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. } => Self::Unavailable(e.to_string()),
            _ => Self::Database(e.to_string()),
        }
    }
}

/// The repositories over one database.
#[derive(Debug, Clone)]
pub struct Store {
    pub blocks: BlockRepo,
    pub mutes: MuteRepo,
    pub groups: GroupRepo,
    pub users: UserRepo,
    pub messages: MessageRepo,
    pub mentions: MentionRepo,
    pub reactions: ReactionRepo,
    pub uploads: UploadRepo,
    db: Database,
}

impl Store {
    /// Connects to `uri` and uses database `db_name`. Operations fail after
    /// five seconds without a reachable server instead of hanging.
    pub async fn connect(uri: &str, db_name: &str) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri).await?;
        options.app_name = Some("chatd".into());
        options.server_selection_timeout = Some(Duration::from_secs(5));
        // a message acknowledged to a sender must survive a database crash:
        // majority-acknowledged and journaled writes, unless the URI says
        // otherwise
        if options.write_concern.is_none() {
            options.write_concern = Some(
                mongodb::options::WriteConcern::builder()
                    .w(mongodb::options::Acknowledgment::Majority)
                    .journal(true)
                    .build(),
            );
        }
        options.connect_timeout = Some(Duration::from_secs(5));
        let client = Client::with_options(options)?;
        let db = client.database(db_name);
        Ok(Self {
            blocks: BlockRepo::new(&db),
            mutes: MuteRepo::new(&db),
            groups: GroupRepo::new(&db),
            users: UserRepo::new(&db),
            messages: MessageRepo::new(&db),
            mentions: MentionRepo::new(&db),
            reactions: ReactionRepo::new(&db),
            uploads: UploadRepo::new(&db),
            db,
        })
    }

    /// Creates the indexes every query relies on. Idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.blocks.ensure_indexes().await?;
        self.mutes.ensure_indexes().await?;
        self.groups.ensure_indexes().await?;
        self.messages.ensure_indexes().await?;
        self.mentions.ensure_indexes().await?;
        self.reactions.ensure_indexes().await?;
        self.uploads.ensure_indexes().await?;
        Ok(())
    }

    /// Deletes what MongoDB holds of a deleted group: its messages,
    /// receipts, sent marks, subscriptions, mentions, reactions and mutes
    /// (whoever they are of: members at the deletion or before), and hands
    /// its uploads to the cleaner (which deletes their objects).
    /// Idempotent: a purge repeated later takes what landed since (a send
    /// that raced the deletion). Returns how many messages it deleted.
    pub async fn purge_group(&self, group: &chat_domain::GroupId) -> Result<u64, StoreError> {
        let (messages, ..) = futures::try_join!(
            self.messages.purge_group(group),
            self.groups.forget_subscriptions(group),
            self.mentions.purge_group(group),
            self.reactions.purge_group(group),
            self.mutes.purge_group(group),
            self.uploads.purge_group(group),
        )?;
        Ok(messages)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(mongodb::bson::doc! { "ping": 1 })
            .await?;
        Ok(())
    }
}

/// The `_id` of a document about one member of one group
/// (`subscriptions`, `sent_marks`, `mutes`): `<group>:<user>`. Ids are letters,
/// digits, `-` and `_`, never `:`, so no two pairs share one.
pub(crate) fn member_key(group: &chat_domain::GroupId, user: &chat_domain::UserId) -> String {
    format!("{group}:{user}")
}

/// The index on `groupId` a collection needs for a deleted group's purge.
pub(crate) fn by_group_index() -> mongodb::IndexModel {
    mongodb::IndexModel::builder()
        .keys(mongodb::bson::doc! { "groupId": 1 })
        .options(
            mongodb::options::IndexOptions::builder()
                .name("group".to_owned())
                .build(),
        )
        .build()
}

/// Deletes every document of `coll` whose `groupId` is `group` (a deleted
/// group's; on [`by_group_index`]).
pub(crate) async fn delete_of_group<T: Send + Sync>(
    coll: &mongodb::Collection<T>,
    group: &chat_domain::GroupId,
) -> Result<(), StoreError> {
    coll.delete_many(mongodb::bson::doc! { "groupId": group.as_str() })
        .await?;
    Ok(())
}

/// A filter on every [`member_key`] of `group`, whatever the user: the
/// `_id` range from `<group>:` up to `<group>;` (`;` follows `:`), which
/// the `_id` index reads directly.
pub(crate) fn member_keys_of(group: &chat_domain::GroupId) -> mongodb::bson::Document {
    mongodb::bson::doc! { "_id": { "$gte": format!("{group}:"), "$lt": format!("{group};") } }
}

pub(crate) fn to_bson_time(ms: chat_domain::Millis) -> mongodb::bson::DateTime {
    mongodb::bson::DateTime::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use chat_domain::{GroupId, UserId};

    #[test]
    fn member_keys_are_injective_since_ids_have_no_colon() {
        let k = |g: &str, u: &str| {
            super::member_key(
                &GroupId::parse(g).expect("group"),
                &UserId::parse(u).expect("user"),
            )
        };
        assert_eq!(k("g-1", "u_2"), "g-1:u_2");
        assert_ne!(k("g", "a_b"), k("g_a", "b"));
        assert!(GroupId::parse("a:b").is_err() && UserId::parse("a:b").is_err());
    }

    /// The range of a group's member keys holds every key of that group
    /// and none of another's, whatever the ids' characters.
    #[test]
    fn a_group_s_member_keys_are_one_range_of_its_own() {
        let g = GroupId::parse("g").expect("group");
        let range = super::member_keys_of(&g);
        let range = range.get_document("_id").expect("range");
        let (from, to) = (
            range.get_str("$gte").expect("from"),
            range.get_str("$lt").expect("to"),
        );
        let inside = |g: &str, u: &str| {
            let k = super::member_key(
                &GroupId::parse(g).expect("group"),
                &UserId::parse(u).expect("user"),
            );
            from <= k.as_str() && k.as_str() < to
        };
        for u in ["a", "Z", "0", "9", "_", "-", "zzzz", "___"] {
            assert!(inside("g", u), "{u}");
        }
        for other in ["g0", "g9", "gA", "gz", "g_", "g-", "f", "h", "G"] {
            for u in ["a", "0", "_", "-", "z"] {
                assert!(!inside(other, u), "{other}:{u}");
            }
        }
    }
}
