//! Group commit for the writes of the send path: concurrent sends' pending
//! inserts go to MongoDB as one `insert` command, their commits as one
//! `update` command with one statement each. Each caller still gets its own
//! result, with the same meaning as a single write.
//!
//! Why: the database's per-command cost (a journal flush per command with
//! `j: true`) dominated. Measured on the SecantusDB stand-in: one insert per
//! command 1,076/s, 100 per command 6,675/s; one update per command 737/s,
//! 100 per command 1,473/s (BENCHMARKS.md). Batching costs no latency at low
//! load: a batch is whatever queued while the previous one was written.

use std::collections::HashMap;

use mongodb::{
    Collection, Database,
    bson::{Bson, Document, doc},
    error::ErrorKind,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

/// Most writes in one command.
const MAX_BATCH: usize = 256;
/// Writes waiting for a batch before callers wait for room.
const QUEUE: usize = 4 * MAX_BATCH;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Handle to one collection's batching tasks; cheap to clone.
#[derive(Debug)]
pub(crate) struct Batcher<T> {
    inserts: mpsc::Sender<(T, Reply<bool>)>,
    updates: mpsc::Sender<(Document, Reply<()>)>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            inserts: self.inserts.clone(),
            updates: self.updates.clone(),
        }
    }
}

impl<T: Serialize + Send + Sync + 'static> Batcher<T> {
    /// Starts the tasks; they end when every handle is dropped.
    pub(crate) fn start(db: &Database, coll: &Collection<T>) -> Self {
        let (inserts, irx) = mpsc::channel(QUEUE);
        let (updates, urx) = mpsc::channel(QUEUE);
        tokio::spawn(insert_loop(coll.clone(), irx));
        tokio::spawn(update_loop(db.clone(), coll.clone(), urx));
        Self { inserts, updates }
    }

    /// Inserts `doc`; `false` if it broke a unique index.
    pub(crate) async fn insert(&self, doc: T) -> Result<bool, StoreError> {
        ask(&self.inserts, doc).await
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

async fn insert_loop<T: Serialize + Send + Sync>(
    coll: Collection<T>,
    mut rx: mpsc::Receiver<(T, Reply<bool>)>,
) {
    while let Some(batch) = next_batch(&mut rx).await {
        let (docs, replies): (Vec<T>, Vec<Reply<bool>>) = batch.into_iter().unzip();
        tracing::trace!(n = docs.len(), "batched insert");
        match coll.insert_many(&docs).ordered(false).await {
            Ok(_) => {
                for r in replies {
                    let _ = r.send(Ok(true));
                }
            }
            Err(e) => {
                // per document: which ones failed, and why
                let failed: Option<HashMap<usize, i32>> = match e.kind.as_ref() {
                    ErrorKind::InsertMany(im) if im.write_concern_error.is_none() => Some(
                        im.write_errors
                            .iter()
                            .flatten()
                            .map(|w| (w.index, w.code))
                            .collect(),
                    ),
                    _ => None,
                };
                for (i, r) in replies.into_iter().enumerate() {
                    let result = match failed.as_ref().map(|f| f.get(&i)) {
                        Some(None) => Ok(true),
                        Some(Some(11000)) => Ok(false),
                        _ => Err(StoreError::from(e.clone())),
                    };
                    let _ = r.send(result);
                }
            }
        }
    }
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
