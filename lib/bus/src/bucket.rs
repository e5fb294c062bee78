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

impl Bus {
    /// Creates bucket `config.bucket` or updates it to `config` (workers,
    /// at start-up), trying for up to 60 s while JetStream has no leader.
    pub(crate) async fn declare_bucket(
        &self,
        name: &'static str,
        config: kv::Config,
    ) -> Result<Bucket, BusError> {
        let mut wait = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.js.create_or_update_key_value(config.clone()).await {
                Ok(_) => return Ok(self.bind_bucket(name)),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(bucket = name, error = %e, "bucket not ready yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(BusError::Unavailable(format!("bucket {name}: {e}"))),
            }
        }
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
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
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
        self.delete_marker(key, None).await.map(drop)
    }

    /// Writes a delete marker under `key` if the key's last stream
    /// sequence is `expected`; whether it did.
    pub(crate) async fn delete_if_last(&self, key: &str, expected: u64) -> Result<bool, BusError> {
        self.delete_marker(key, Some(expected)).await
    }

    async fn delete_marker(&self, key: &str, expected: Option<u64>) -> Result<bool, BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        if let Some(expected) = expected {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
        }
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
