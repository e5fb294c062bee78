//! What the sockets of this edge wrote, reported to workers as delivered
//! receipts once a second.

use super::*;

/// How often deliveries are reported to workers as receipts.
pub(super) const DELIVERED_FLUSH: Duration = Duration::from_secs(1);
/// Group seqs written to sockets on this edge and not yet reported as
/// delivered, by group and member. Keys are the shared names of the live
/// frames and sessions: recording a flush allocates nothing (a `String` per
/// group per flush showed in fan-out profiles).
#[derive(Default)]
pub(crate) struct DeliveredHub(std::sync::Mutex<Delivered>);

type Delivered = HashMap<Arc<str>, HashMap<Arc<str>, u64>>;

impl DeliveredHub {
    pub(super) fn record(&self, user: &Arc<str>, written: &mut Vec<(Arc<str>, u64)>) {
        if written.is_empty() {
            return;
        }
        let mut hub = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (group, seq) in written.drain(..) {
            let members = hub.entry(group).or_default();
            match members.get_mut(user) {
                Some(e) => *e = (*e).max(seq),
                None => {
                    members.insert(user.clone(), seq);
                }
            }
        }
    }

    pub(super) fn take(&self) -> Delivered {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Most members reported in one call.
pub(super) const DELIVERED_BATCH: usize = 1000;

/// Reports what reached this edge's sockets as delivered, every
/// `DELIVERED_FLUSH`: one call per group, however many members and
/// messages (one per member and group made receipts the largest database
/// load with 1,000 members online). Ends with the edge.
pub(crate) async fn report_delivered(app: std::sync::Weak<crate::Inner>) {
    let mut tick = tokio::time::interval(DELIVERED_FLUSH);
    loop {
        tick.tick().await;
        let Some(inner) = app.upgrade() else { return };
        flush_delivered(&AppState(inner)).await;
    }
}

pub(crate) async fn flush_delivered(app: &AppState) {
    for (group_id, members) in app.delivered.take() {
        let members: Vec<pb::MemberSeq> = members
            .into_iter()
            .map(|(user_id, seq)| pb::MemberSeq {
                user_id: user_id.to_string(),
                seq,
            })
            .collect();
        for chunk in members.chunks(DELIVERED_BATCH) {
            let req = pb::MarkDeliveredRequest {
                caller: String::new(),
                group_id: group_id.to_string(),
                seq: 0,
                members: chunk.to_vec(),
            };
            if let Err(e) = rpc!(app, MessagesClient, mark_delivered, req) {
                tracing::warn!(error = %e, group = %group_id, "cannot record deliveries");
            }
        }
    }
}
