//! The worker role: tonic services that validate, authorise, persist to
//! MongoDB and publish to JetStream.
//!
//! Workers hold no state of their own between calls: any number run side by
//! side, and any one of them can serve any call.

use std::future::Future;
use std::sync::Arc;

use chat_bus::{Bus, BusError};
use chat_domain::{DomainError, Limits};
use chat_rpc::pb::{groups_server::GroupsServer, sessions_server::SessionsServer};
use chat_store::{Store, StoreError};
use tokio::net::TcpListener;

mod groups;
mod sessions;

/// What a worker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub limits: Limits,
    /// Most groups `GET /groups` returns.
    pub max_listed_groups: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_listed_groups: 500,
        }
    }
}

/// Why a call failed; becomes a gRPC status the edge maps for the client.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Status;
        match e {
            WorkerError::Domain(DomainError::Invalid(m)) => Status::invalid_argument(m),
            WorkerError::Domain(DomainError::TooLarge(m)) => Status::out_of_range(m),
            WorkerError::Domain(DomainError::Forbidden(m)) => Status::permission_denied(m),
            WorkerError::Domain(DomainError::Conflict(m)) => Status::failed_precondition(m),
            WorkerError::NotFound(what) => Status::not_found(format!("{what} not found")),
            WorkerError::Store(StoreError::Unavailable(m))
            | WorkerError::Bus(BusError::Unavailable(m)) => {
                tracing::warn!(error = %m, "dependency unavailable");
                Status::unavailable("a backing service is unavailable; retry later")
            }
            other => {
                tracing::error!(error = %other, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

pub(crate) struct State {
    pub store: Store,
    pub bus: Bus,
    pub config: Config,
}

/// Serves the worker's gRPC services on `listener` until `shutdown`
/// completes, then finishes the calls in flight.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    bus: Bus,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let state = Arc::new(State { store, bus, config });
    tonic::transport::Server::builder()
        .add_service(GroupsServer::new(groups::GroupsService(state.clone())))
        .add_service(SessionsServer::new(sessions::SessionsService(state)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

/// Parses an id from a request field, as `invalid` on failure.
pub(crate) fn parse_id<T: std::str::FromStr<Err = DomainError>>(
    value: &str,
) -> Result<T, WorkerError> {
    Ok(value.parse()?)
}
