//! The push hook: for each message, the members who had no connection open
//! when it was written (and those of them it mentions), on
//! `chat.push.<groupId>` in the `CHAT_PUSH` stream, for an operator's push
//! gateway to notify their phones. Ids only, never content. Published by
//! the persist loop with the message id as `Nats-Msg-Id`, so a batch
//! delivered twice pushes once. A gateway reads the stream with a consumer
//! of its own; a worker run with a webhook posts each event through the
//! shared `push-webhook` consumer, whose redeliveries are the retries.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{self, pull},
};
use bytes::Bytes;
use chat_domain::GroupId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Bus, BusError, MSG_ID};

/// Every group's push events.
pub const PUSH_SUBJECTS: &str = "chat.push.*";
/// The consumer workers post webhooks from.
pub const WEBHOOK_CONSUMER: &str = "push-webhook";
/// Deliveries of one event to the webhook before it is given up.
pub const WEBHOOK_ATTEMPTS: i64 = 8;

/// The subject of `group`'s push events.
pub fn push_subject(group: &GroupId) -> String {
    format!("chat.push.{group}")
}

/// One message's push event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushEvent {
    /// `message`.
    pub kind: String,
    pub group_id: String,
    pub message_id: String,
    pub seq: u64,
    pub sender_id: String,
    /// `text`, `image`, `video` or `audio`.
    #[serde(rename = "type")]
    pub message_type: String,
    /// RFC 3339.
    pub created_at: String,
    /// Members (never the sender) with no connection open.
    pub recipients: Vec<String>,
    /// Those of them the message mentions.
    #[serde(default)]
    pub mentioned: Vec<String>,
    /// A message with more recipients than [`PUSH_RECIPIENTS_MAX`] is told
    /// in several events, numbered from 0 (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub part: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most recipients one event names (about 200 KB of ids).
pub const PUSH_RECIPIENTS_MAX: usize = 10_000;

/// One delivery of the webhook consumer.
pub struct PushDelivery(jetstream::Message);

impl PushDelivery {
    /// The event's JSON, as published.
    pub fn body(&self) -> &Bytes {
        &self.0.payload
    }

    /// How many times it has been delivered, this one included.
    pub fn attempt(&self) -> i64 {
        self.0.info().map(|i| i.delivered).unwrap_or(1)
    }

    /// Posted: done.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.0.ack().await.map_err(BusError::nats)
    }

    /// Not posted: deliver it again after `delay`.
    pub async fn retry(&self, delay: Duration) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(BusError::nats)
    }

    /// Given up.
    pub async fn give_up(&self) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Term).await.map_err(BusError::nats)
    }
}

impl Bus {
    /// Publishes `event` once (the message id is its de-duplication id).
    pub async fn publish_push(&self, event: &PushEvent) -> Result<(), BusError> {
        let group = GroupId::parse(event.group_id.as_str())
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            MSG_ID,
            format!("push-{}-{}", event.message_id, event.part).as_str(),
        );
        let payload = Bytes::from(serde_json::to_vec(event).map_err(BusError::nats)?);
        self.js
            .publish_with_headers(push_subject(&group), headers, payload)
            .await
            .map_err(BusError::nats)?
            .await
            .map_err(BusError::nats)?;
        Ok(())
    }

    /// The webhook consumer's deliveries (created if needed; workers only).
    pub async fn webhook_feed(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<PushDelivery, BusError>>, BusError> {
        let config = pull::Config {
            durable_name: Some(WEBHOOK_CONSUMER.into()),
            description: Some("workers post push events to the configured webhook".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: WEBHOOK_ATTEMPTS,
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        };
        let consumer = self
            .js
            .get_stream_no_info(&self.defs.push_stream.name)
            .await
            .map_err(BusError::nats)?
            .get_or_create_consumer(WEBHOOK_CONSUMER, config)
            .await
            .map_err(BusError::nats)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(64)
            .messages()
            .await
            .map_err(BusError::nats)?;
        Ok(messages.map(|m| m.map(PushDelivery).map_err(BusError::nats)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_documented_shape() {
        let e = PushEvent {
            kind: "message".into(),
            group_id: "g".into(),
            message_id: "m".into(),
            seq: 3,
            sender_id: "alice".into(),
            message_type: "text".into(),
            created_at: "2026-12-02T10:15:30.123Z".into(),
            recipients: vec!["bob".into()],
            mentioned: vec![],
            part: 0,
        };
        assert_eq!(
            serde_json::to_value(&e).expect("json"),
            serde_json::json!({"kind": "message", "groupId": "g", "messageId": "m", "seq": 3,
                "senderId": "alice", "type": "text", "createdAt": "2026-12-02T10:15:30.123Z",
                "recipients": ["bob"], "mentioned": []})
        );
        let g = GroupId::parse("g-1").expect("id");
        assert_eq!(push_subject(&g), "chat.push.g-1");
    }
}
