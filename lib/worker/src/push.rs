//! The push hook (`chat_bus::PushEvent`): for each persisted message, the
//! members with no connection open who do not mute the group (or whom the
//! message mentions), published once to `chat.push.<group>`
//! for an operator's push gateway, and optionally posted to a webhook.
//!
//! Who is online comes from presence: every worker keeps the set of users
//! online (read from the `CHAT_PRESENCE` bucket at start and again every
//! minute, and kept current by the announcements between), so deciding who
//! gets a push costs one set lookup per member and no read.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chat_bus::{PresenceChange, PushEvent};
use chat_domain::{GroupId, UserId};
use chat_protocol::format_millis;
use chat_store::{Mention, StoredMessage};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{State, WorkerError};

/// How often the set of online users is read again whole (announcements
/// lost across a NATS disconnect are healed by it).
const REREAD_EVERY: Duration = Duration::from_secs(60);
/// The header carrying the webhook's signature.
pub const SIGNATURE_HEADER: &str = "x-chat-signature";
/// The header carrying the time the signature covers.
pub const TIMESTAMP_HEADER: &str = "x-chat-timestamp";

/// Where push events are posted, and the secret that signs them.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The users online as this worker knows them, with the revision of what
/// said so.
#[derive(Default)]
pub(crate) struct Online(Mutex<HashMap<String, (bool, u64)>>);

impl Online {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (bool, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `user` is `online` as of revision `rev`, unless something
    /// newer said otherwise.
    fn note(&self, user: &str, online: bool, rev: u64) {
        let mut users = self.lock();
        match users.get_mut(user) {
            Some((_, at)) if *at > rev => {}
            Some(entry) => *entry = (online, rev),
            None => {
                users.insert(user.to_owned(), (online, rev));
            }
        }
    }

    /// A whole read of who is online at revisions up to `rev`: users it
    /// does not name and nothing newer names are offline.
    fn reread(&self, online: &[(String, u64)]) {
        let named: std::collections::HashSet<&str> =
            online.iter().map(|(u, _)| u.as_str()).collect();
        let newest = online.iter().map(|(_, r)| *r).max().unwrap_or(0);
        let mut users = self.lock();
        users.retain(|u, (_, at)| named.contains(u.as_str()) || *at > newest);
        drop(users);
        for (user, rev) in online {
            self.note(user, true, *rev);
        }
    }

    pub(crate) fn is_online(&self, user: &str) -> bool {
        self.lock().get(user).is_some_and(|(on, _)| *on)
    }
}

/// Keeps the set of online users current, forever.
pub(crate) async fn follow_presence(s: Arc<State>) {
    let presence = s.bus.presence();
    let mut sub = loop {
        match s.bus.presence_changes().await {
            Ok(sub) => break sub,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hear presence yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut reread = tokio::time::interval(REREAD_EVERY);
    loop {
        tokio::select! {
            _ = reread.tick() => match presence.online_users().await {
                Ok(users) => s.online.reread(&users),
                Err(e) => tracing::warn!(error = %e, "cannot read who is online"),
            },
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                if let Ok(c) = serde_json::from_slice::<PresenceChange>(&msg.payload) {
                    s.online.note(&c.user_id, c.online, c.rev);
                }
            }
        }
    }
}

/// Whom message `m` is pushed to, of the `offline` members (each with the
/// seq after which it sees the group's messages): not its sender, nor a
/// member added after it under `joined` history (the add can commit
/// before the message is persisted), nor one who muted the group unless
/// it is `named`.
fn recipients(
    offline: &[(&UserId, u64)],
    m: &StoredMessage,
    muted: &HashSet<String>,
    named: &HashSet<&str>,
) -> Vec<String> {
    let seq = m.seq.unwrap_or_default();
    offline
        .iter()
        .filter(|(u, sees_after)| *u != &m.sender_id && seq > *sees_after)
        .filter(|(u, _)| !muted.contains(u.as_str()) || named.contains(u.as_str()))
        .map(|(u, _)| u.to_string())
        .collect()
}

/// Publishes the push events of a persisted batch: per message, the members
/// other than the sender with no connection open. One group read per group
/// of the batch.
pub(crate) async fn push(
    s: &State,
    rows: &[StoredMessage],
    mentions: &[Mention],
) -> Result<(), WorkerError> {
    let mut by_group: BTreeMap<&GroupId, Vec<&StoredMessage>> = BTreeMap::new();
    for m in rows {
        by_group.entry(&m.group_id).or_default().push(m);
    }
    for (group, messages) in by_group {
        let record = match s.load(group).await {
            Ok(r) => r,
            // a group deleted since: nobody to tell
            Err(WorkerError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        // each with the seq after which it sees the group's messages
        let offline: Vec<(&UserId, u64)> = record
            .group
            .members
            .iter()
            .filter(|m| !s.online.is_online(m.user_id.as_str()))
            .map(|m| (&m.user_id, record.group.view_of(m)))
            .collect();
        // those who muted the group hear only of what mentions them: one
        // read per group of the batch, when someone could be pushed at all
        let muted: HashSet<String> = if offline.is_empty() {
            HashSet::new()
        } else {
            s.store
                .mutes
                .muted_in(group, chat_domain::now_millis())
                .await?
                .into_iter()
                .collect()
        };
        for m in messages {
            // whom it mentions: pushed even if they mute the group, and
            // named in the event
            let named: HashSet<&str> = mentions
                .iter()
                .filter(|x| x.message == m.id)
                .map(|x| x.user.as_str())
                .collect();
            let recipients = recipients(&offline, m, &muted, &named);
            if recipients.is_empty() {
                continue;
            }
            // a group of more offline members than one event names is
            // told in parts (a publish is at most 1 MiB)
            for (part, recipients) in recipients.chunks(chat_bus::PUSH_RECIPIENTS_MAX).enumerate() {
                let mentioned = recipients
                    .iter()
                    .filter(|r| named.contains(r.as_str()))
                    .cloned()
                    .collect();
                let event = PushEvent {
                    kind: "message".into(),
                    group_id: m.group_id.to_string(),
                    message_id: m.id.to_string(),
                    seq: m.seq.unwrap_or_default(),
                    sender_id: m.sender_id.to_string(),
                    message_type: m.kind.clone(),
                    created_at: format_millis(m.created_at),
                    recipients: recipients.to_vec(),
                    mentioned,
                    part: u32::try_from(part).unwrap_or(u32::MAX),
                };
                s.bus.publish_push(&event).await?;
                metrics::counter!("chat_push_events_total").increment(1);
            }
        }
    }
    Ok(())
}

/// The signature of `body` sent at `timestamp` (unix seconds):
/// `sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` under the
/// webhook's secret.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", hex::encode(digest))
}

/// Posts every push event to the webhook, forever: a 2xx answer is done,
/// anything else is tried again later (growing delays, up to
/// `chat_bus::WEBHOOK_ATTEMPTS` deliveries in all).
pub(crate) async fn post_webhooks(s: Arc<State>, hook: Webhook) {
    let http = match chat_http::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook's HTTP client: no push events are posted");
            return;
        }
    };
    loop {
        let mut feed = match s.bus.webhook_feed().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read push events for the webhook yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(delivery) = feed.next().await {
            let Ok(d) = delivery else { break };
            let now = chat_domain::now_millis() / 1000;
            let sent = http
                .post(&hook.url)
                .header("content-type", "application/json")
                .header(TIMESTAMP_HEADER, now.to_string())
                .header(SIGNATURE_HEADER, signature(&hook.secret, now, d.body()))
                .body(d.body().clone())
                .send()
                .await;
            let ok = matches!(&sent, Ok(r) if r.status().is_success());
            let attempt = d.attempt();
            let acked = if ok {
                metrics::counter!("chat_push_webhook_total", "outcome" => "posted").increment(1);
                d.ack().await
            } else if attempt >= chat_bus::WEBHOOK_ATTEMPTS {
                metrics::counter!("chat_push_webhook_total", "outcome" => "given_up").increment(1);
                tracing::warn!(attempt, "push event not posted; giving up on it");
                d.give_up().await
            } else {
                metrics::counter!("chat_push_webhook_total", "outcome" => "retried").increment(1);
                let why = match &sent {
                    Ok(r) => r.status().to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(attempt, error = %why, "push event not posted; trying again");
                let delay = Duration::from_millis(500 * (1 << attempt.clamp(0, 6)));
                d.retry(delay).await
            };
            if let Err(e) = acked {
                tracing::debug!(error = %e, "push delivery not settled; it comes again");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_goes_to_offline_members_who_see_the_message_and_did_not_mute_it() {
        let user = |u: &str| UserId::parse(u).expect("id");
        let (alice, bob, cy, dee) = (user("alice"), user("bob"), user("cy"), user("dee"));
        let m = StoredMessage {
            id: chat_domain::MessageId::generate(),
            group_id: GroupId::generate(),
            sender_id: alice.clone(),
            client_msg_id: chat_domain::ClientMsgId::parse("c1").expect("id"),
            kind: "text".into(),
            key_id: "k".into(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
            binding: 2,
            seq: Some(7),
            stream_seq: Some(70),
            created_at: 0,
            edited_at: None,
            deleted_at: None,
            version: 0,
        };
        // cy joined (under `joined` history) after seq 7, dee after 6
        let offline = [(&alice, 0), (&bob, 0), (&cy, 7), (&dee, 6)];
        let none = HashSet::new();
        assert_eq!(
            recipients(&offline, &m, &HashSet::new(), &none),
            ["bob", "dee"],
            "not the sender, nor a member added after the message"
        );
        let muted: HashSet<String> = ["bob".to_owned(), "dee".to_owned()].into();
        assert_eq!(
            recipients(&offline, &m, &muted, &none),
            Vec::<String>::new()
        );
        let named: HashSet<&str> = ["dee", "cy"].into();
        assert_eq!(
            recipients(&offline, &m, &muted, &named),
            ["dee"],
            "a mention passes a mute, never the history's start"
        );
    }

    #[test]
    fn the_newest_word_on_a_user_wins() {
        let o = Online::default();
        o.note("ann", true, 5);
        o.note("ann", false, 4);
        assert!(o.is_online("ann"), "an older announcement changes nothing");
        o.note("ann", false, 6);
        assert!(!o.is_online("ann"));
        assert!(!o.is_online("nobody"));
    }

    #[test]
    fn a_whole_read_forgets_who_it_does_not_name() {
        let o = Online::default();
        o.note("ann", true, 5);
        o.note("bob", true, 20);
        o.reread(&[("cy".to_owned(), 10)]);
        assert!(!o.is_online("ann"), "gone by the read");
        assert!(o.is_online("bob"), "announced after the read");
        assert!(o.is_online("cy"));
    }

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        // the HMAC-SHA256 of "1.what do ya want for nothing?" under "Jefe",
        // as Python's hmac module computes it
        let sig = signature("Jefe", 1, b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=a9049465ce89cfb8e9aac62333abda66f80e3403f51f57f6bae3c3a4485eca38"
        );
        assert_ne!(sig, signature("Jefe", 2, b"what do ya want for nothing?"));
        assert_ne!(sig, signature("Jeff", 1, b"what do ya want for nothing?"));
        assert_eq!(sig, signature("Jefe", 1, b"what do ya want for nothing?"));
    }
}
