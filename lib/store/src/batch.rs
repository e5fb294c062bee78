//! Group commit for concurrent updates (the receipts' watermark raises):
//! they go to MongoDB as one `update` command with one statement each, and
//! each caller still gets its own result, with the same meaning as a single
//! write. (The messages themselves are written in batches by the persist
//! loop of the workers, behind the stream.)
//!
//! Why: the database's per-command cost (a journal flush per command with
//! `j: true`) dominated. Measured on the SecantusDB stand-in: one update per
//! command 737/s, 100 per command 1,473/s (BENCHMARKS.md). Batching costs no
//! latency at low load: a batch is whatever queued while the previous one
//! was written.

use std::collections::HashMap;

use mongodb::{
    Collection, Database,
    bson::{Bson, Document, doc},
};
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

/// Most writes in one command.
const MAX_BATCH: usize = 256;
/// Writes waiting for a batch before callers wait for room.
const QUEUE: usize = 4 * MAX_BATCH;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Handle to one collection's batching task; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    updates: mpsc::Sender<(Document, Reply<()>)>,
}

impl Batcher {
    /// Starts the task; it ends when every handle is dropped.
    pub(crate) fn start<T: Send + Sync + 'static>(db: &Database, coll: &Collection<T>) -> Self {
        let (updates, urx) = mpsc::channel(QUEUE);
        tokio::spawn(update_loop(db.clone(), coll.clone(), urx));
        Self { updates }
    }

    /// Applies one update statement `{q, u}`.
    pub(crate) async fn update(&self, statement: Document) -> Result<(), StoreError> {
        ask(&self.updates, statement).await
    }
}

/// Queues `item` for the next batch and waits for its own result.
async fn ask<X, R>(queue: &mpsc::Sender<(X, Reply<R>)>, item: X) -> Result<R, StoreError> {
    let stopped = || StoreError::Unavailable("the write batcher stopped".into());
    let (tx, rx) = oneshot::channel();
    queue.send((item, tx)).await.map_err(|_| stopped())?;
    rx.await.map_err(|_| stopped())?
}

/// Takes what is queued, up to `MAX_BATCH`, after waiting for the first.
async fn next_batch<X>(rx: &mut mpsc::Receiver<X>) -> Option<Vec<X>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(x) => batch.push(x),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn update_loop<T: Send + Sync>(
    db: Database,
    coll: Collection<T>,
    mut rx: mpsc::Receiver<(Document, Reply<()>)>,
) {
    let write_concern = coll
        .write_concern()
        .and_then(|wc| mongodb::bson::to_document(wc).ok());
    while let Some(batch) = next_batch(&mut rx).await {
        let (statements, replies): (Vec<Document>, Vec<Reply<()>>) = batch.into_iter().unzip();
        tracing::trace!(n = statements.len(), "batched update");
        let mut command = doc! {
            "update": coll.name(),
            "updates": statements.into_iter().map(Bson::Document).collect::<Vec<_>>(),
            "ordered": false,
        };
        if let Some(wc) = &write_concern {
            command.insert("writeConcern", wc.clone());
        }
        match db.run_command(command).await {
            Ok(reply) => {
                let failed: HashMap<usize, String> = reply
                    .get_array("writeErrors")
                    .map(|errors| {
                        errors
                            .iter()
                            .filter_map(|e| e.as_document())
                            .map(|e| {
                                let index = e.get_i32("index").unwrap_or(-1);
                                let msg = e.get_str("errmsg").unwrap_or("write failed");
                                (usize::try_from(index).unwrap_or(usize::MAX), msg.to_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let concern = reply.get_document("writeConcernError").ok().map(|e| {
                    e.get_str("errmsg")
                        .unwrap_or("write concern failed")
                        .to_owned()
                });
                for (i, r) in replies.into_iter().enumerate() {
                    let result = match (failed.get(&i), &concern) {
                        (Some(msg), _) | (None, Some(msg)) => {
                            Err(StoreError::Database(msg.clone()))
                        }
                        (None, None) => Ok(()),
                    };
                    let _ = r.send(result);
                }
            }
            Err(e) => {
                for r in replies {
                    let _ = r.send(Err(StoreError::from(e.clone())));
                }
            }
        }
    }
}
