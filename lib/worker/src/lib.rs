//! The worker role: tonic services that validate, authorise, persist to
//! MongoDB and publish to JetStream.
//!
//! Workers hold no state of their own between calls: any number run side by
//! side, and any one of them can serve any call.

use std::future::Future;
use std::sync::Arc;

use chat_bus::{Bus, BusError};
use chat_crypto::KeyRing;
use chat_domain::{DomainError, GroupId, Limits, MediaPolicy, UserId};
use chat_rpc::{
    Checked, Checker, ServiceSecret,
    pb::{
        groups_server::GroupsServer, health_server::HealthServer, media_server::MediaServer,
        messages_server::MessagesServer, sessions_server::SessionsServer,
    },
};
use chat_store::{GroupRecord, Membership, Objects, Store, StoreError};
use tokio::net::TcpListener;

/// gRPC calls one edge connection may have in flight at once; more wait
/// on the edge's side.
const MAX_CALLS_PER_CONNECTION: u32 = 1024;

mod backlog;
mod devices;
mod groups;
mod media;
mod members;
mod messages;
mod persist;
mod publish;
mod push;
mod sessions;

pub use push::{SIGNATURE_HEADER, TIMESTAMP_HEADER, Webhook, signature};

/// What a worker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub limits: Limits,
    /// Most groups one page of `GET /groups` holds.
    pub max_listed_groups: i64,
    /// Most members, summed over its groups, one page of `GET /groups`
    /// carries: a page ends early rather than outgrow a transport limit.
    pub max_listed_members: usize,
    /// Most groups a user can be a member of: adding someone beyond it is
    /// refused (so no one can be buried under groups others add them to).
    pub max_groups_per_user: u64,
    /// Most users one user can block from adding them to groups.
    pub max_blocks_per_user: u64,
    /// Most messages one search call opens (text is encrypted, so a search
    /// reads and decrypts; `next` continues where it stopped).
    pub max_search_scan: u32,
    /// Age after which a retried send whose first attempt is not in the
    /// stream is taken as lost and published again (a publish buffered
    /// through a disconnect may land until then).
    pub resolve_pending_after: std::time::Duration,
    /// Most new messages of one group published as one atomic batch
    /// (`publish.rs`); 1: each on its own.
    pub publish_batch_max: usize,
    /// How long a send's `clientMsgId` is remembered (the send log's
    /// `max_age`): a retry within it returns the original message.
    pub idempotency_window: std::time::Duration,
    /// How long after sending it a sender may edit a text message (zero:
    /// never).
    pub edit_window: std::time::Duration,
    /// What media may be uploaded.
    pub media: MediaPolicy,
    /// How long an upload URL is valid.
    pub upload_url_ttl: std::time::Duration,
    /// How long a download URL is valid.
    pub download_url_ttl: std::time::Duration,
    /// Uploads no message uses after this long are deleted.
    pub unreferenced_upload_ttl: std::time::Duration,
    /// How many devices a user may have, and when an idle one is forgotten.
    pub devices: DeviceLimits,
    /// The secret edges present on every call (and the worker proves it
    /// knows when asked); `None` only on loopback.
    pub service_secret: Option<ServiceSecret>,
    /// Serve gRPC over TLS with this certificate (and require edges'
    /// certificates, if it names a CA for them).
    pub tls: Option<chat_rpc::ServerTls>,
    /// Publish push events (`push.rs`) for members with no connection.
    pub push: bool,
    /// Post push events to this webhook too (implies `push`).
    pub webhook: Option<push::Webhook>,
}

/// Devices per user.
#[derive(Debug, Clone)]
pub struct DeviceLimits {
    /// Most devices (and so durable consumer pairs) per user; a new device
    /// beyond it evicts the least recently seen.
    pub max_per_user: usize,
    /// A device not seen for this long is forgotten when the user registers
    /// another, and its consumers expire by themselves after as long.
    pub idle: std::time::Duration,
    /// Most new devices a user may register per hour (`rate_limited` past
    /// it): each costs a key of `CHAT_PLACES` in nats-server's memory, and
    /// each eviction a delete marker, for the bucket's 60 days.
    pub new_per_hour: u32,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            new_per_hour: 30,
            max_per_user: 16,
            idle: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_listed_groups: 100,
            max_listed_members: 20_000,
            max_groups_per_user: 1_000,
            max_blocks_per_user: 1_000,
            max_search_scan: 1_000,
            resolve_pending_after: std::time::Duration::from_secs(30),
            publish_batch_max: 64,
            idempotency_window: std::time::Duration::from_secs(24 * 3600),
            edit_window: std::time::Duration::from_secs(3600),
            media: MediaPolicy::default(),
            upload_url_ttl: std::time::Duration::from_secs(15 * 60),
            download_url_ttl: std::time::Duration::from_secs(5 * 60),
            unreferenced_upload_ttl: std::time::Duration::from_secs(24 * 3600),
            devices: DeviceLimits::default(),
            service_secret: None,
            tls: None,
            push: false,
            webhook: None,
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
    /// The caller did this too often: retry later (the message says when).
    #[error("{0}")]
    RateLimited(String),
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
            WorkerError::RateLimited(m) => Status::resource_exhausted(m),
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

/// What a worker talks to.
#[derive(Debug)]
pub struct Deps {
    pub store: Store,
    pub bus: Bus,
    /// The send log (`Bus::send_log`), declared with the streams.
    pub sends: chat_bus::SendLog,
    /// Every device's place (`Bus::declare_places`), declared with the streams.
    pub places: chat_bus::Places,
    /// Presence (`Bus::declare_presence`): the worker sweeps dead edges.
    pub presence: chat_bus::Presence,
    pub keys: KeyRing,
    /// The media bucket; without it media calls answer `unavailable`.
    pub objects: Option<Objects>,
}

pub(crate) struct State {
    pub store: Store,
    pub bus: Bus,
    pub keys: KeyRing,
    /// The media bucket, if configured.
    pub objects: Option<Objects>,
    pub config: Config,
    pub positions: publish::Positions,
    /// Who is a member of which group (`members.rs`).
    pub members: members::Members,
    /// Each group's history setting (`members.rs`).
    pub histories: members::Histories,
    /// One entry per send for the idempotency window.
    pub sends: chat_bus::SendLog,
    /// Every device's place in the streams.
    pub places: chat_bus::Places,
    /// Who is online, for the push hook (`push.rs`).
    pub online: push::Online,
    /// Room in the message log for messages not yet in MongoDB
    /// (`backlog.rs`).
    pub log_room: backlog::LogRoom,
    /// This process's id, drawn when it starts: edges sign calls for it.
    pub instance: chat_rpc::Instance,
}

impl State {
    pub(crate) async fn load(&self, id: &GroupId) -> Result<GroupRecord, WorkerError> {
        self.store
            .groups
            .get(id)
            .await?
            .ok_or(WorkerError::NotFound("group"))
    }

    /// Group `id`'s owner and history setting: [`State::load`] without the
    /// member list (an edit in a group of 1,000 needs no more).
    pub(crate) async fn settings(
        &self,
        id: &GroupId,
    ) -> Result<(UserId, chat_domain::History), WorkerError> {
        self.store
            .groups
            .settings(id)
            .await?
            .ok_or(WorkerError::NotFound("group"))
    }

    /// Group `id`'s history setting, remembered once read (it never
    /// changes).
    pub(crate) async fn history(&self, id: &GroupId) -> Result<chat_domain::History, WorkerError> {
        if let Some(history) = self.histories.get(id) {
            return Ok(history);
        }
        let (_, history) = self.settings(id).await?;
        self.histories.remember(id, history);
        Ok(history)
    }

    /// Fails unless `caller` is a member of group `id`; reads no more than
    /// that. Returns the `seq` the caller's view of the group's history
    /// starts after (0: all of it).
    pub(crate) async fn check_member(
        &self,
        caller: &UserId,
        id: &GroupId,
    ) -> Result<u64, WorkerError> {
        let generation = self.bus.generation();
        if let Some(from) = self.members.visible_from(id, caller, generation) {
            return Ok(from);
        }
        let ticket = self.members.ticket(generation);
        let visible_from = member_or_refused(self.store.groups.membership(id, caller).await?)?;
        self.members.remember(id, caller, visible_from, ticket);
        Ok(visible_from)
    }

    /// `group`'s membership changed: forget it here and tell every other
    /// worker. A notice that cannot go out is logged: the others' entries
    /// then last until their expiry (`members::TTL`) or the next reconnect.
    pub(crate) async fn members_changed(&self, group: &GroupId) {
        self.members.forget(group);
        if let Err(e) = self.bus.announce_members_changed(group).await {
            tracing::warn!(group = %group, error = %e, "cannot announce a membership change");
        }
    }

    /// `user` left `group` or was removed: the event that stops every
    /// edge's live delivery to it. It must go out: after a few quick tries
    /// it is retried in the background (logged) rather than failing a
    /// change that already committed.
    pub(crate) async fn unsubscribed_live(&self, group: &GroupId, user: &UserId) {
        if self
            .bus
            .publish_membership(group, user, false)
            .await
            .is_ok()
        {
            return;
        }
        let (bus, group, user) = (self.bus.clone(), group.clone(), user.clone());
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_millis(200);
            for _ in 0..20 {
                match bus.publish_membership(&group, &user, false).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::error!(group = %group, user = %user, error = %e, "cannot publish a removal to the edges yet; retrying");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            tracing::error!(group = %group, user = %user, "gave up publishing a removal: the member's open connections keep receiving the group until they reconnect");
        });
    }

    pub(crate) async fn load_as_member(
        &self,
        caller: &UserId,
        id: &GroupId,
    ) -> Result<GroupRecord, WorkerError> {
        let record = self.load(id).await?;
        if !record.group.is_member(caller) {
            return Err(DomainError::Forbidden("you are not a member of this group".into()).into());
        }
        Ok(record)
    }
}

/// The `seq` a member's view starts after, or why the caller may not act
/// on the group: `forbidden` for a non-member, `not_found` for no group.
pub(crate) fn member_or_refused(m: Membership) -> Result<u64, WorkerError> {
    match m {
        Membership::Member { visible_from } => Ok(visible_from),
        Membership::NotMember => {
            Err(DomainError::Forbidden("you are not a member of this group".into()).into())
        }
        Membership::NoSuchGroup => Err(WorkerError::NotFound("group")),
    }
}

/// Every hour, for the worker's lifetime: deletes ended mutes (reads skip
/// them already, so this only keeps the collection to the mutes that
/// last), and finishes the groups deleted in the last day again (a send
/// that raced a deletion may have landed after its purge; a deletion a
/// stopped worker left halfway is finished).
async fn hourly_upkeep(s: Arc<State>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let now = chat_domain::now_millis();
        match s.store.mutes.purge_ended(now).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "ended mutes purged"),
            Err(e) => tracing::debug!(error = %e, "cannot purge ended mutes yet"),
        }
        if let Err(e) = finish_deletions(&s, now - DELETION_REPURGED_FOR_MS).await {
            tracing::warn!(error = %e, "cannot purge deleted groups again yet");
        }
    }
}

/// How long after a group's deletion the hourly pass purges it again.
const DELETION_REPURGED_FOR_MS: i64 = 25 * 3600 * 1000;

/// Finishes again every group deleted at or after `since` (ms), newest
/// first (a send that raced a deletion is likeliest there); one that
/// cannot be finished now is logged and left for the next pass.
pub(crate) async fn finish_deletions(s: &Arc<State>, since: i64) -> Result<usize, WorkerError> {
    let groups = s.store.groups.deleted_since(since, 10_000).await?;
    let service = groups::GroupsService(s.clone());
    for id in &groups {
        let finished = match s.store.groups.tombstone(id).await {
            Ok(Some(tomb)) => service.finish_deletion(&tomb).await.map(drop),
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = finished {
            tracing::warn!(group = %id, error = %e, "cannot finish a deleted group yet");
        }
    }
    Ok(groups.len())
}

/// How long a TLS handshake with an edge may take.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the worker's gRPC services on `listener` until `shutdown`
/// completes, then finishes the calls in flight.
pub async fn serve(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // before any task starts, so that a failure leaves none behind
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        // a handshake that does not finish in time is dropped: each pending
        // one is a task
        server = server.tls_config(tls.config().timeout(TLS_HANDSHAKE_TIMEOUT))?;
    }
    let Deps {
        store,
        bus,
        keys,
        objects,
        sends,
        places,
        presence,
    } = deps;
    let state = Arc::new(State {
        store,
        bus,
        keys,
        objects,
        config,
        positions: Default::default(),
        members: Default::default(),
        histories: Default::default(),
        online: Default::default(),
        sends,
        places,
        log_room: Default::default(),
        instance: rand::random(),
    });
    let marks = Arc::new(persist::SentMarks::default());
    let backlog = tokio::spawn(backlog::watch(state.clone()));
    let buckets = tokio::spawn(backlog::watch_buckets(state.bus.clone()));
    let persister = tokio::spawn(persist::persist(state.clone(), marks.clone()));
    let stopping = state.clone();
    let listener_of_members = tokio::spawn(forget_changed_groups(state.clone()));
    // every call but the health check is signed with the secret
    let checker = state
        .config
        .service_secret
        .clone()
        .map(|secret| Checker::new(secret, state.instance));
    let cleaner = tokio::spawn(media::clean_uploads(state.clone()));
    let mutes = tokio::spawn(hourly_upkeep(state.clone()));
    let sweeper = tokio::spawn(sweep_presence(presence));
    let pushing = state.config.push || state.config.webhook.is_some();
    let follower = pushing.then(|| tokio::spawn(push::follow_presence(state.clone())));
    let poster = state
        .config
        .webhook
        .clone()
        .map(|hook| tokio::spawn(push::post_webhooks(state.clone(), hook)));
    let result = server
        // calls in flight per edge connection: what a group's publish queue
        // and its waiters can hold is bounded by these
        .max_concurrent_streams(Some(MAX_CALLS_PER_CONNECTION))
        // every call's logs carry the request id the edge sent
        .trace_fn(|req| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            tracing::info_span!("rpc", path = %req.uri().path(), request_id = %id)
        })
        .add_service(Checked::new(
            GroupsServer::new(groups::GroupsService(state.clone())),
            checker.clone(),
        ))
        .add_service(Checked::new(
            SessionsServer::new(sessions::SessionsService(state.clone())),
            checker.clone(),
        ))
        .add_service(Checked::new(
            MessagesServer::new(messages::MessagesService(state.clone())),
            checker.clone(),
        ))
        .add_service(Checked::new(
            MediaServer::new(media::MediaService(state.clone())),
            checker,
        ))
        // the health check only: edges verify the worker's proof before they
        // call it
        .add_service(HealthServer::new(sessions::HealthService(state)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    persister.abort();
    // the sent marks the persist loop gathered and did not write yet
    let raised = tokio::time::timeout(persist::FINAL_RAISE, marks.raise(&stopping)).await;
    if !matches!(raised, Ok(true)) {
        tracing::warn!(
            "sent marks left unwritten at shutdown; the senders' next messages raise past them"
        );
    }
    listener_of_members.abort();
    backlog.abort();
    buckets.abort();
    cleaner.abort();
    mutes.abort();
    sweeper.abort();
    for task in [follower, poster].into_iter().flatten() {
        task.abort();
    }
    result
}

/// Takes edges that stopped beating out of presence, every
/// [`chat_bus::BEAT_EVERY`], forever. Every worker sweeps: two sweeps of
/// one dead edge change each record once (compare-and-set), and only the
/// write that turned a user offline announces it.
async fn sweep_presence(presence: chat_bus::Presence) {
    let mut tick = tokio::time::interval(chat_bus::BEAT_EVERY);
    let mut seen = chat_bus::Beats::default();
    loop {
        tick.tick().await;
        match presence.sweep(&mut seen).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(users = n, "users of dead edges taken offline"),
            Err(e) => tracing::warn!(error = %e, "presence sweep failed; trying again"),
        }
    }
}

/// Forgets the cached memberships of every group another worker announces
/// a change of, forever.
async fn forget_changed_groups(s: Arc<State>) {
    use futures::StreamExt;
    loop {
        match s.bus.member_changes().await {
            Ok(mut notices) => {
                while let Some(n) = notices.next().await {
                    if let Some(group) = chat_bus::group_of_members_subject(n.subject.as_str()) {
                        s.members.forget(&group);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for membership changes"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Parses an id from a request field, as `invalid` on failure.
pub(crate) fn parse_id<T: std::str::FromStr<Err = DomainError>>(
    value: &str,
) -> Result<T, WorkerError> {
    Ok(value.parse()?)
}

/// A bus on `nats` (a test's own nats-server) as a worker connects, with
/// the streams declared.
#[cfg(test)]
pub(crate) async fn test_bus(nats: &chat_stack::Nats) -> Bus {
    let user = nats.users.for_role("worker");
    let bus = Bus::connect(
        &nats.url,
        "test",
        Some(chat_bus::Credentials {
            user: user.user.to_owned(),
            password: user.password.clone(),
        }),
        chat_bus::Definitions::load(1).expect("definitions"),
    )
    .await
    .expect("connected");
    bus.ensure_streams().await.expect("streams");
    bus
}
