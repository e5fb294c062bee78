//! A JetStream key-value bucket spoken to through its stream: a publish
//! with an expected last subject sequence to write (0: create), the stream
//! leader's message get to read, a delete marker to forget.
//!
//! Not the key-value client: that reads with direct gets, which in a
//! cluster answered "no responders" for as long as a killed node stayed
//! down (the send log's retries failed for that long).

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream::LastRawMessageErrorKind};
use bytes::Bytes;

use crate::{Bus, BusError};

/// The header a key-value delete marker carries.
const KV_OPERATION: &str = "KV-Operation";

/// The header that gives one message a lifetime of its own, in seconds
/// (nats-server 2.11; the stream must allow it: [`Bus::declare_bucket_with_ttls`]).
const NATS_TTL: &str = "Nats-TTL";

/// Adds the headers of a conditional write (`expected`) and of a message
/// that nats-server removes after `ttl` (whole seconds, at least one).
fn write_headers(expected: Option<u64>, ttl: Option<Duration>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(expected) = expected {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
    }
    if let Some(ttl) = ttl {
        headers.insert(NATS_TTL, ttl.as_secs().max(1).to_string().as_str());
    }
    headers
}

/// One bucket; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    js: jetstream::Context,
    name: &'static str,
}

/// A key's newest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its stream sequence: what a conditional write expects.
    pub revision: u64,
    /// `None`: a delete marker.
    pub value: Option<Bytes>,
}

/// What a bucket holds, as its stream reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketSize {
    /// Entries and delete markers held: nats-server keeps every key of a
    /// stream in memory, a few hundred bytes each (OPERATIONS.md).
    pub keys: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

impl Bus {
    /// Creates bucket `config.bucket` or updates it to `config` (workers,
    /// at start-up), trying for up to 60 s while JetStream has no leader.
    pub(crate) async fn declare_bucket(
        &self,
        name: &'static str,
        config: kv::Config,
    ) -> Result<Bucket, BusError> {
        self.declare_bucket_as(name, config, false).await
    }

    /// [`Bus::declare_bucket`] for a bucket whose entries may carry
    /// lifetimes of their own (`Nats-TTL`), shorter than its `max_age`.
    pub(crate) async fn declare_bucket_with_ttls(
        &self,
        name: &'static str,
        config: kv::Config,
    ) -> Result<Bucket, BusError> {
        self.declare_bucket_as(name, config, true).await
    }

    /// What bucket `name` holds now: one JetStream API request.
    pub async fn bucket_size(&self, name: &str) -> Result<BucketSize, BusError> {
        let stream = self
            .js
            .get_stream(format!("KV_{name}"))
            .await
            .map_err(BusError::nats)?;
        let state = &stream.cached_info().state;
        Ok(BucketSize {
            keys: state.messages,
            bytes: state.bytes,
        })
    }

    async fn declare_bucket_as(
        &self,
        name: &'static str,
        config: kv::Config,
        ttls: bool,
    ) -> Result<Bucket, BusError> {
        let mut wait = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_declare_bucket(name, &config, ttls).await {
                Ok(()) => return Ok(self.bind_bucket(name)),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(bucket = name, error = %e, "bucket not ready yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(BusError::Unavailable(format!("bucket {name}: {e}"))),
            }
        }
    }

    /// The key-value configuration allows entries lifetimes of their own
    /// only together with markers for expired entries (`limit_markers`: one
    /// more write per expired entry), and nats-server refuses an update that
    /// would turn them off: such a bucket is created through the key-value
    /// client and then given them, and updated through its stream's
    /// configuration. (nats-server before 2.11 ignores both the setting and
    /// the header: entries then live the whole window, as before.)
    async fn try_declare_bucket(
        &self,
        name: &'static str,
        config: &kv::Config,
        ttls: bool,
    ) -> Result<(), String> {
        let stream_name = format!("KV_{name}");
        let existing = if ttls {
            self.js.get_stream(&stream_name).await.ok()
        } else {
            None
        };
        let mut stream = match existing {
            Some(stream) => {
                let mut stream = stream.cached_info().config.clone();
                stream.description = Some(config.description.clone());
                stream.max_age = config.max_age;
                stream.max_message_size = config.max_value_size;
                stream.num_replicas = config.num_replicas.max(1);
                stream
            }
            None => {
                let created = self
                    .js
                    .create_or_update_key_value(config.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                if !ttls {
                    return Ok(());
                }
                created.stream.cached_info().config.clone()
            }
        };
        stream.allow_message_ttl = true;
        self.js
            .update_stream(stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Bucket `name` as it is (edges, which may not declare it); nothing
    /// is asked of NATS until it is used.
    pub(crate) fn bind_bucket(&self, name: &'static str) -> Bucket {
        Bucket {
            js: self.js.clone(),
            name,
        }
    }
}

impl Bucket {
    fn subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.name)
    }

    /// Writes `value` under `key` if the key's last stream sequence is
    /// `expected` (0: no entry); its new revision, or `None` if the key's
    /// last sequence is another.
    pub(crate) async fn put_if_last(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<Option<u64>, BusError> {
        self.put_if_last_for(key, value, expected, None).await
    }

    /// [`Bucket::put_if_last`], for an entry that nats-server removes after
    /// `ttl` if nothing replaces it first (`None`: the bucket's `max_age`).
    pub(crate) async fn put_if_last_for(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, BusError> {
        let headers = write_headers(Some(expected), ttl);
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await
            .map_err(BusError::nats)?
            .await;
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// Writes `value` under `key`, whatever is there.
    pub(crate) async fn put(&self, key: &str, value: Bytes) -> Result<(), BusError> {
        self.js
            .publish(self.subject(key), value)
            .await
            .map_err(BusError::nats)?
            .await
            .map_err(BusError::nats)?;
        Ok(())
    }

    /// Writes a delete marker under `key`, whatever is there.
    pub(crate) async fn delete(&self, key: &str) -> Result<(), BusError> {
        self.delete_marker(key, None, None).await.map(drop)
    }

    /// [`Bucket::delete`], the marker removed after `ttl` (the bucket must
    /// allow lifetimes: [`Bus::declare_bucket_with_ttls`]), and with it the
    /// key: nats-server holds every key of a stream in memory, markers too.
    pub(crate) async fn delete_for(&self, key: &str, ttl: Duration) -> Result<(), BusError> {
        self.delete_marker(key, None, Some(ttl)).await.map(drop)
    }

    /// Writes a delete marker under `key` if the key's last stream
    /// sequence is `expected`, removed after `ttl` (`None`: the bucket's
    /// `max_age`); whether it did.
    pub(crate) async fn delete_if_last(
        &self,
        key: &str,
        expected: u64,
        ttl: Option<Duration>,
    ) -> Result<bool, BusError> {
        self.delete_marker(key, Some(expected), ttl).await
    }

    async fn delete_marker(
        &self,
        key: &str,
        expected: Option<u64>,
        ttl: Option<Duration>,
    ) -> Result<bool, BusError> {
        let mut headers = write_headers(expected, ttl);
        headers.insert(KV_OPERATION, "DEL");
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, Bytes::new())
            .await
            .map_err(BusError::nats)?
            .await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// The key's newest entry, if it has one.
    pub(crate) async fn last(&self, key: &str) -> Result<Option<Entry>, BusError> {
        let stream = self
            .js
            .get_stream_no_info(format!("KV_{}", self.name))
            .await
            .map_err(BusError::nats)?;
        let msg = match stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(BusError::nats(e)),
        };
        let value = msg
            .headers
            .get(KV_OPERATION)
            .is_none()
            .then_some(msg.payload);
        Ok(Some(Entry {
            revision: msg.sequence,
            value,
        }))
    }
}
