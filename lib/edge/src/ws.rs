//! WebSocket sessions at `/ws`: one reader loop and one writer task per
//! connection, plus one delivery task per durable consumer of the device.
//!
//! Deliveries are acknowledged to JetStream only after the writer has put
//! them on the socket, so a connection that drops loses nothing: what was not
//! written is handed back (nak) and comes again on the next connection.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{AckKind, Message as JsMessage};
use axum::{
    extract::{
        Query, State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket},
    },
    http::request::Parts,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chat_auth::{AuthError, Identity};
use chat_bus::{BusError, Envelope, Feed};
use chat_crypto::{MessageBinding, Sealed};
use chat_domain::{DeviceId, UserId};
use chat_protocol::{
    AcknowledgeMessage, ClientFrame, ErrorCode, GroupRef, MAX_REQUEST_ID_LEN, MessageView,
    SendMessage, ServerFrame, SessionInfo, event, format_millis,
};
use chat_rpc::pb;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tracing::Instrument;

use crate::{
    ApiError, AppState,
    auth::{WS_PROTOCOL, bearer, subprotocol_bearer},
    claims,
    limits::TokenBucket,
    live::{LiveFrame, NotYet, Registration, Sink},
    workers::rpc,
};

/// Close code sent when a client abuses the connection (RFC 6455 1008).
pub const CLOSE_POLICY: u16 = 1008;
/// Most messages one pull asks for.
const PULL_BATCH: usize = 256;
/// How long one pull stays open; also the longest a closing session takes to
/// hand back what it holds.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long a delivery may wait for room in a client's queue.
const SLOW_CLIENT: Duration = Duration::from_secs(30);
/// How often deliveries are reported to workers as receipts.
const DELIVERED_FLUSH: Duration = Duration::from_secs(1);
/// How long a closing connection waits for the client's close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);
/// Close code sent when the edge drains (RFC 6455 1012, service restart):
/// reconnect, to this or another edge.
pub const CLOSE_RESTART: u16 = 1012;
/// Close code sent to a connection when its device connects again (on any
/// edge): one device, one connection, so that they never split deliveries.
pub const CLOSE_REPLACED: u16 = 4409;
/// Read and write buffer of a WebSocket; larger frames still pass (the
/// buffers grow), this is only what every connection holds.
const WS_BUFFER: usize = 4 * 1024;
/// Close code sent when the device was evicted (the user connected more
/// devices than allowed and this one was the least recently seen): its
/// position is gone; reconnecting registers it again.
pub const CLOSE_EVICTED: u16 = 4410;
/// Close code sent when a client sends a message past the hard limit
/// (RFC 6455 1009, message too big).
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// Most bytes tungstenite may hold for writing to one socket; a client that
/// does not read past it is closed (see `write_loop`).
const WS_MAX_WRITE_BUFFER: usize = 2 * 1024 * 1024;
/// Close code sent when a client cannot keep up with its deliveries.
pub const CLOSE_TOO_SLOW: u16 = 1013;

#[derive(Debug, Deserialize)]
pub(crate) struct WsQuery {
    token: Option<String>,
    device: Option<String>,
}

/// `GET /ws`: verifies the token (header or `?token=`), opens the device's
/// session on a worker, then upgrades.
pub(crate) async fn upgrade(
    State(app): State<AppState>,
    Query(q): Query<WsQuery>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let token = bearer(&parts)
        .or_else(|| subprotocol_bearer(&parts))
        .map(str::to_owned)
        .or(q.token)
        .ok_or(AuthError::Missing)?;
    let me = app.verifier.verify(&token)?;
    if let Err(limited) = app.limits.user(&me.user_id) {
        return Ok(limited.into_response());
    }
    let device = match q.device {
        Some(d) => DeviceId::parse(d).map_err(|e| ApiError::invalid(e.to_string()))?,
        None => DeviceId::default_device(),
    };
    // registered before the session opens: membership changes from then
    // on are replayed over the groups the session reads
    let (tx, inbox) = Outbox::new(app.config.outbox_frames, app.config.outbox_bytes);
    let live = Arc::new(app.live.register(me.user_id.as_str(), Arc::new(tx.clone())));
    let opened = rpc!(
        app,
        SessionsClient,
        open_session,
        pb::OpenSessionRequest {
            user_id: me.user_id.to_string(),
            device_id: device.to_string(),
            display_name: me.name.clone().unwrap_or_default(),
        }
    )?
    .into_inner();
    if live.load(&opened.groups).is_err() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "your groups changed too often while connecting; retry",
        ));
    }
    let limit = app.config.max_ws_message_bytes;
    Ok(ws
        .protocols([WS_PROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite's 128 KiB defaults made an idle connection cost about
        // 200 KiB of the edge's memory; chat frames are small
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("session", user = %me.user_id, device = %device, conn = live.id());
            let tracker = app.sessions_running.clone();
            let outbox = (tx, inbox, live);
            tracker.track_future(Session::run(app, me, device, socket, outbox).instrument(span))
        }))
}

/// What the writer task puts on the socket.
enum Outgoing {
    Frame(String),
    Delivery(Delivery),
    /// A group message from the live feed (see `live`).
    Live(LiveFrame),
    /// Everything up to this stream sequence is queued before this: once
    /// written, the device's position may move there.
    Through(u64),
    Close(u16, &'static str),
}

impl Outgoing {
    /// Bytes this holds, counted against the connection's budget.
    fn size(&self) -> usize {
        match self {
            Outgoing::Frame(text) => text.len(),
            Outgoing::Delivery(d) => d.text.as_ref().map_or(0, |t| t.len()) + d.msg.payload.len(),
            Outgoing::Live(f) => f.text.len(),
            Outgoing::Through(_) => 0,
            Outgoing::Close(_, reason) => reason.len(),
        }
    }
}

/// The way into a connection's writer: frames in order, bounded in count
/// (`outbox_frames`) and in bytes (`outbox_bytes`), and a close channel that
/// never waits behind them, so a connection whose client stopped reading can
/// still be closed.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<(Outgoing, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    close: mpsc::Sender<(u16, &'static str)>,
}

/// The writer's end of an [`Outbox`].
struct Inbox {
    rx: mpsc::Receiver<(Outgoing, OwnedSemaphorePermit)>,
    close: mpsc::Receiver<(u16, &'static str)>,
}

impl Outbox {
    fn new(frames: usize, bytes: usize) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let (close, close_rx) = mpsc::channel(1);
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
        (
            Self {
                tx,
                budget: Arc::new(Semaphore::new(bytes)),
                budget_bytes: bytes,
                close,
            },
            Inbox {
                rx,
                close: close_rx,
            },
        )
    }

    /// Queues `out` once there is room; an error if the writer is gone.
    async fn send(&self, out: Outgoing) -> Result<(), ()> {
        // a frame larger than the whole budget takes all of it
        let n = out.size().clamp(1, self.budget_bytes);
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
            .await
            .map_err(|_| ())?;
        self.tx.send((out, permit)).await.map_err(|_| ())
    }
}

impl Outbox {
    /// Asks the writer to close the connection now, ahead of what is queued.
    fn close_now(&self, code: u16, reason: &'static str) {
        let _ = self.close.try_send((code, reason));
    }
}

impl Sink for Outbox {
    /// Queues a live frame without waiting: a connection whose queue is full
    /// fell too far behind and is closed (it resumes from its position).
    fn offer(&self, frame: LiveFrame) -> Result<(), bool> {
        use tokio::sync::{TryAcquireError, mpsc::error::TrySendError};
        let out = Outgoing::Live(frame);
        let n = out.size().clamp(1, self.budget_bytes);
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                self.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                return Err(true);
            }
            Err(TryAcquireError::Closed) => return Err(false),
        };
        match self.tx.try_send((out, permit)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                Err(true)
            }
            Err(TrySendError::Closed(_)) => Err(false),
        }
    }
}

/// A delivery from JetStream, acknowledged once written.
struct Delivery {
    /// `None`: written to this connection before (the consumer gave it
    /// again after a rewind); acknowledged in order, not written twice.
    text: Option<Utf8Bytes>,
    msg: Box<JsMessage>,
    /// For group messages: the group and seq to report as delivered.
    receipt: Option<(String, u64)>,
    /// The consumer's rewinds when this was handed on, and the counter: a
    /// delivery from before a rewind is never acknowledged (a late ack of
    /// it would move the rewound consumer's floor past what comes again).
    rewinds: (u64, Arc<std::sync::atomic::AtomicU64>),
}

impl Delivery {
    /// Whether the consumer was rewound since this was handed on.
    fn stale(&self) -> bool {
        self.rewinds.1.load(std::sync::atomic::Ordering::SeqCst) != self.rewinds.0
    }
}

struct Session {
    app: AppState,
    me: Identity,
    device: DeviceId,
    tx: Outbox,
    bucket: TokenBucket,
    errors_in_a_row: u32,
    group_delivery: Option<JoinHandle<()>>,
    stopped: watch::Receiver<bool>,
    /// The connection's place in the live feed.
    live: Arc<Registration>,
}

impl Session {
    async fn run(
        app: AppState,
        me: Identity,
        device: DeviceId,
        socket: WebSocket,
        (tx, inbox, live): (Outbox, Inbox, Arc<Registration>),
    ) {
        metrics::gauge!("chat_ws_connections").increment(1);
        let (sink, mut stream) = socket.split();
        let saver = Arc::new(Saver {
            live: live.clone(),
            position: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            turn: tokio::sync::Mutex::new(()),
            bus: app.bus.clone(),
            user: me.user_id.clone(),
            device: device.clone(),
        });
        let mut writer = tokio::spawn(write_loop(
            sink,
            inbox,
            app.clone(),
            me.user_id.to_string(),
            saver.clone(),
        ));
        let mut writer_done = false;
        tracing::debug!("connected");

        let hello = ServerFrame {
            event: event::SESSION.to_owned(),
            id: None,
            data: SessionInfo {
                user_id: me.user_id.to_string(),
                device_id: device.to_string(),
            },
        };
        let _ = tx.send(Outgoing::Frame(to_json(&hello))).await;

        let (stop, stopped) = watch::channel(false);
        let user_delivery = tokio::spawn(deliver(
            app.clone(),
            Feed::User,
            (me.user_id.clone(), device.clone()),
            tx.clone(),
            stopped.clone(),
            None,
        ));
        let config = &app.config;
        let mut session = Session {
            bucket: TokenBucket::new(config.requests_per_sec, config.request_burst),
            app: app.clone(),
            me,
            device,
            tx,
            errors_in_a_row: 0,
            group_delivery: None,
            stopped,
            live,
        };
        session.start_group_delivery();
        let mut checkpoint =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECKPOINT, CHECKPOINT);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut closing = app.closing.subscribe();
        let mut claim = Box::pin(claims::claim(&app, &session.me.user_id, &session.device)).await;
        loop {
            let msg = tokio::select! {
                msg = stream.next() => msg,
                _ = async { drop(closing.wait_for(|c| *c).await) } => {
                    session.tx.close_now(CLOSE_RESTART, "server restarting; reconnect");
                    None
                }
                Ok(()) = &mut claim.replaced => {
                    session.tx.close_now(CLOSE_REPLACED, "this device connected again elsewhere");
                    None
                }
                // the writer gave up (a client that stopped reading, a
                // broken socket): nothing more can reach this client
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    None
                }
                _ = checkpoint.tick() => {
                    let saver = saver.clone();
                    tokio::spawn(async move { saver.save().await });
                    continue;
                }
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    if too_large(&e) {
                        // past the hard limit: tungstenite stopped reading it
                        session.tx.close_now(CLOSE_TOO_LARGE, "frame too large");
                        writer_done |= finish_close(&mut writer, writer_done).await;
                    }
                    break;
                }
                None => break,
            };
            let keep_going = match msg {
                // boxed: the request's future (any RPC) is allocated while
                // it runs, not held by every idle session (13.7 KiB before)
                Message::Text(text) => Box::pin(session.on_text(&text)).await,
                Message::Binary(_) => {
                    Box::pin(session.reply_error(
                        None,
                        ApiError::invalid("binary frames are not supported; send JSON text frames"),
                    ))
                    .await
                }
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => true,
            };
            if !keep_going {
                // we closed: read on until the client's close reply, so the
                // close frame is not lost to a reset of unread data
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
                    while let Some(Ok(msg)) = stream.next().await {
                        if matches!(msg, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
                break;
            }
        }
        // hand back what the delivery tasks hold, then report what was written;
        // the socket closes as soon as the writer is done with it
        drop(stream);
        let _ = stop.send(true);
        let group_delivery = session.group_delivery.take();
        // the hub queues nothing more, and lets go of the writer's queue
        session.live.leave();
        drop(session);
        let aborts = [
            Some(user_delivery.abort_handle()),
            group_delivery.as_ref().map(JoinHandle::abort_handle),
            Some(writer.abort_handle()),
        ];
        let drain = async {
            let _ = user_delivery.await;
            if let Some(h) = group_delivery {
                let _ = h.await;
            }
            if !writer_done {
                let _ = writer.await;
            }
        };
        if tokio::time::timeout(PULL_EXPIRES * 2, Box::pin(drain))
            .await
            .is_err()
        {
            // nothing of this session may outlive it
            tracing::warn!("session did not drain in time; aborting its tasks");
            for task in aborts.into_iter().flatten() {
                task.abort();
            }
        }
        metrics::gauge!("chat_ws_connections").decrement(1);
    }

    /// Catches the device up from its group consumer (which the worker
    /// created when the session opened), then hands it over to the live
    /// feed.
    fn start_group_delivery(&mut self) {
        self.group_delivery = Some(tokio::spawn(deliver(
            self.app.clone(),
            Feed::Groups,
            (self.me.user_id.clone(), self.device.clone()),
            self.tx.clone(),
            self.stopped.clone(),
            Some(self.live.clone()),
        )));
    }

    /// Handles one text frame; returns whether to keep the connection.
    /// Every frame counts against the rate limit, and the size is checked
    /// before anything is parsed.
    async fn on_text(&mut self, text: &str) -> bool {
        let limited = !self.bucket.take();
        let max = self.app.config.max_frame_bytes;
        if limited || text.len() > max {
            // only the id is read, to answer it: the rest is skipped without
            // building anything (the frame is under the hard limit)
            let id = serde_json::from_str::<IdOnly>(text)
                .ok()
                .and_then(|f| f.id)
                .filter(request_id_ok);
            let e = if text.len() > max {
                ApiError::new(
                    ErrorCode::TooLarge,
                    format!("frame is larger than {max} bytes"),
                )
            } else {
                ApiError::new(ErrorCode::RateLimited, "too many requests; slow down")
            };
            return self.reply_error(id, e).await;
        }
        let frame: ClientFrame = match chat_protocol::decode_frame(text) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("malformed frame: {e}");
                return self.reply_error(None, ApiError::invalid(msg)).await;
            }
        };
        let id = match frame.id {
            None | Some(Value::Null) => None,
            Some(id) if request_id_ok(&id) => Some(id),
            Some(_) => {
                let msg = format!(
                    "id must be a string or number of at most {MAX_REQUEST_ID_LEN} characters"
                );
                return self.reply_error(None, ApiError::invalid(msg)).await;
            }
        };
        match self.dispatch(&frame.event, frame.data).await {
            Ok(data) => {
                self.errors_in_a_row = 0;
                match id {
                    Some(id) => {
                        self.send(to_json(&ServerFrame {
                            event: event::ACK.into(),
                            id: Some(id),
                            data,
                        }))
                        .await
                    }
                    None => true,
                }
            }
            Err(e) => self.reply_error(id, e).await,
        }
    }

    async fn dispatch(&mut self, name: &str, data: Value) -> Result<Value, ApiError> {
        let known = [
            event::NOTIFY_CREATE_GROUP,
            event::SUBSCRIBE_TO_GROUP,
            event::SEND_GROUP_MESSAGE,
            event::ACKNOWLEDGE_GROUP_MESSAGE,
        ];
        let label = known.into_iter().find(|e| *e == name).unwrap_or("unknown");
        metrics::counter!("chat_ws_requests_total", "event" => label).increment(1);
        let caller = self.me.user_id.to_string();
        match name {
            event::NOTIFY_CREATE_GROUP => {
                let GroupRef { group_id } = parse_data(data)?;
                let r = rpc!(
                    self.app,
                    GroupsClient,
                    notify_group_created,
                    pb::GroupRequest {
                        caller,
                        group_id: group_id.clone(),
                    }
                )?
                .into_inner();
                Ok(json!({ "groupId": group_id, "notified": r.notified }))
            }
            event::SEND_GROUP_MESSAGE => {
                let m: SendMessage = parse_data(data)?;
                if m.kind == "text" && m.text.is_none() {
                    return Err(ApiError::invalid("a text message needs text"));
                }
                let media = m.media.map(|x| pb::MediaRef {
                    key: x.key,
                    mime: x.mime,
                    size: x.size,
                });
                let r = rpc!(
                    self.app,
                    MessagesClient,
                    send,
                    pb::SendMessageRequest {
                        caller,
                        group_id: m.group_id,
                        client_msg_id: m.client_msg_id,
                        r#type: m.kind,
                        text: m.text.unwrap_or_default(),
                        media,
                    }
                )?
                .into_inner();
                Ok(json!({
                    "messageId": r.message_id,
                    "groupId": r.group_id,
                    "seq": r.seq,
                    "createdAt": format_millis(r.created_at_ms),
                }))
            }
            event::ACKNOWLEDGE_GROUP_MESSAGE => {
                let m: AcknowledgeMessage = parse_data(data)?;
                let r = rpc!(
                    self.app,
                    MessagesClient,
                    acknowledge,
                    pb::AcknowledgeRequest {
                        caller,
                        group_id: m.group_id.clone(),
                        message_id: m.message_id.clone(),
                    }
                )?
                .into_inner();
                Ok(
                    json!({ "groupId": m.group_id, "messageId": m.message_id, "readSeq": r.read_seq }),
                )
            }
            event::SUBSCRIBE_TO_GROUP => {
                let GroupRef { group_id } = parse_data(data)?;
                let r = rpc!(
                    self.app,
                    GroupsClient,
                    subscribe_to_group,
                    pb::GroupRequest { caller, group_id }
                )?
                .into_inner();
                Ok(json!({ "groupId": r.group_id }))
            }
            other => {
                let mut shown: String = other.chars().take(64).collect();
                if shown.len() < other.len() {
                    shown.push('…');
                }
                Err(ApiError::invalid(format!("unknown event {shown:?}")))
            }
        }
    }

    async fn reply_error(&mut self, id: Option<Value>, e: ApiError) -> bool {
        // only the client's own mistakes count: a client that retries while
        // a backing service is down (as it should) is not abusing anything
        if !matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal) {
            self.errors_in_a_row += 1;
        }
        metrics::counter!("chat_ws_errors_total", "code" => e.code.as_str()).increment(1);
        let frame = ServerFrame {
            event: event::ERROR.into(),
            id,
            data: e.body(),
        };
        if !self.send(to_json(&frame)).await {
            return false;
        }
        if self.errors_in_a_row >= self.app.config.max_errors_in_a_row {
            tracing::info!(user = %self.me.user_id, "closing a connection that sends only bad requests");
            let _ = self
                .tx
                .send(Outgoing::Close(CLOSE_POLICY, "too many bad requests"))
                .await;
            return false;
        }
        true
    }

    async fn send(&self, text: String) -> bool {
        self.tx.send(Outgoing::Frame(text)).await.is_ok()
    }
}

/// Whether a read failed because the client sent more than the hard limit.
fn too_large(e: &axum::Error) -> bool {
    use tungstenite::error::{CapacityError, Error};
    let source = std::error::Error::source(e);
    matches!(
        source.and_then(|s| s.downcast_ref::<Error>()),
        Some(Error::Capacity(
            CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders
        ))
    )
}

/// Waits (bounded) for the writer to put a close frame out; returns whether
/// it has ended.
async fn finish_close(writer: &mut JoinHandle<()>, done: bool) -> bool {
    if done {
        return true;
    }
    tokio::time::timeout(CLOSE_HANDSHAKE, writer).await.is_ok()
}

/// The request id of an oversized frame; every other field is skipped.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<Value>,
}

/// Whether `id` can be a request id: a short string or number.
fn request_id_ok(id: &Value) -> bool {
    matches!(id, Value::String(_) | Value::Number(_)) && id.to_string().len() <= MAX_REQUEST_ID_LEN
}

fn parse_data<T: serde::de::DeserializeOwned>(data: Value) -> Result<T, ApiError> {
    chat_protocol::decode_data(data).map_err(|e| ApiError::invalid(format!("bad data: {e}")))
}

fn to_json<T: serde::Serialize>(frame: &ServerFrame<T>) -> String {
    // our own frames always serialise; an empty string is never sent
    serde_json::to_string(frame).unwrap_or_default()
}

/// The name of a frame's event, for metrics (one of ours, or "other").
fn event_of(frame: &str) -> &'static str {
    const NAMES: [&str; 7] = [
        event::ACK,
        event::ERROR,
        event::SESSION,
        event::GROUP_CREATED,
        event::GROUP_UPDATED,
        event::GROUP_MESSAGE,
        event::MESSAGE_STATUS,
    ];
    let name = frame
        .strip_prefix("{\"event\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    NAMES.into_iter().find(|n| *n == name).unwrap_or("other")
}

/// Group seqs written to sockets on this edge and not yet reported as
/// delivered, by group and member.
#[derive(Default)]
pub(crate) struct DeliveredHub(std::sync::Mutex<HashMap<String, HashMap<String, u64>>>);

impl DeliveredHub {
    fn record(&self, user: &str, written: &mut HashMap<String, u64>) {
        let mut hub = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (group, seq) in written.drain() {
            let members = hub.entry(group).or_default();
            match members.get_mut(user) {
                Some(e) => *e = (*e).max(seq),
                None => {
                    members.insert(user.to_owned(), seq);
                }
            }
        }
    }

    fn take(&self) -> HashMap<String, HashMap<String, u64>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Most members reported in one call.
const DELIVERED_BATCH: usize = 1000;

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
            .map(|(user_id, seq)| pb::MemberSeq { user_id, seq })
            .collect();
        for chunk in members.chunks(DELIVERED_BATCH) {
            let req = pb::MarkDeliveredRequest {
                caller: String::new(),
                group_id: group_id.clone(),
                seq: 0,
                members: chunk.to_vec(),
            };
            if let Err(e) = rpc!(app, MessagesClient, mark_delivered, req) {
                tracing::warn!(error = %e, group = %group_id, "cannot record deliveries");
            }
        }
    }
}

/// Writes frames to the socket; acknowledges deliveries once written and
/// hands back those it could not write.
///
/// Frames are fed to the socket and flushed when the queue runs dry (or
/// every `WRITE_BURST` frames); only then are the deliveries of the burst
/// acknowledged, with one ack per consumer: the consumers acknowledge
/// everything up to the acked message (`AckPolicy::All`), so a burst of 256
/// costs one ack instead of 256 (BENCHMARKS.md).
async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    app: AppState,
    user: String,
    saver: Arc<Saver>,
) {
    let delivered = Written {
        hub: &app.delivered,
        user: user.as_str(),
        position: &saver.position,
    };
    // the newest group stream sequence written, the device's position once
    // flushed
    let mut through = 0u64;
    // a write or flush failed: nothing more counts as written
    let mut failed = false;
    // looked up once: a registry lookup per live frame showed in profiles
    let live_out = metrics::counter!("chat_ws_events_out_total", "event" => event::GROUP_MESSAGE);
    let live_deliveries = metrics::counter!("chat_ws_deliveries_total", "feed" => "live");
    let deadline = app.config.write_timeout;
    // the newest written delivery of each consumer (user, groups) not yet
    // acknowledged, with its receipt
    let mut written: [Option<Delivery>; 2] = [None, None];
    // group seqs written in this burst, reported as delivered once flushed
    let mut receipts: HashMap<String, u64> = HashMap::new();
    let mut burst = 0usize;
    loop {
        // a close asked for out of band goes ahead of everything queued
        let (out, _permit) = tokio::select! {
            biased;
            Some((code, reason)) = inbox.close.recv() => (Outgoing::Close(code, reason), None),
            next = inbox.rx.recv() => match next {
                Some((out, permit)) => (out, Some(permit)),
                None => break,
            },
        };
        let ok = match out {
            Outgoing::Frame(text) => {
                metrics::counter!("chat_ws_events_out_total", "event" => event_of(&text))
                    .increment(1);
                fed(&mut sink, Message::Text(text.into()), deadline).await
            }
            Outgoing::Live(f) => {
                let ok = fed(&mut sink, Message::Text(f.text), deadline).await;
                if ok {
                    live_out.increment(1);
                    live_deliveries.increment(1);
                    // no allocation per frame for a group already noted
                    match receipts.get_mut(&*f.group) {
                        Some(e) => *e = (*e).max(f.seq),
                        None => {
                            receipts.insert(f.group.to_string(), f.seq);
                        }
                    }
                    through = through.max(f.stream_seq);
                }
                ok
            }
            Outgoing::Through(seq) => {
                through = through.max(seq);
                true
            }
            Outgoing::Delivery(d) => {
                let slot = usize::from(d.receipt.is_some());
                let ok = match &d.text {
                    Some(text) => fed(&mut sink, Message::Text(text.clone()), deadline).await,
                    None => true,
                };
                if ok {
                    if let Some(text) = &d.text {
                        metrics::counter!("chat_ws_events_out_total", "event" => event_of(text))
                            .increment(1);
                        metrics::counter!("chat_ws_deliveries_total", "feed" => if slot == 1 { "groups" } else { "user" })
                            .increment(1);
                    }
                    if let Some((group, seq)) = &d.receipt {
                        let e = receipts.entry(group.clone()).or_insert(*seq);
                        *e = (*e).max(*seq);
                        if let Ok(info) = d.msg.info() {
                            through = through.max(info.stream_sequence);
                        }
                    }
                    written[slot] = Some(d);
                } else {
                    let _ = d.msg.ack_with(AckKind::Nak(None)).await;
                }
                ok
            }
            Outgoing::Close(code, reason) => {
                // what was written before the close is delivered
                flush_and_ack(
                    &mut sink,
                    &mut written,
                    &mut receipts,
                    (&delivered, through),
                    deadline,
                )
                .await;
                let _ = tokio::time::timeout(FINAL_SAVE, saver.save()).await;
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                within(CLOSE_HANDSHAKE, sink.send(Message::Close(Some(frame)))).await;
                false
            }
        };
        if !ok {
            failed = true;
            break;
        }
        burst += 1;
        if inbox.rx.is_empty() || burst >= WRITE_BURST {
            burst = 0;
            if !flush_and_ack(
                &mut sink,
                &mut written,
                &mut receipts,
                (&delivered, through),
                deadline,
            )
            .await
            {
                gave_up();
                failed = true;
                break;
            }
        }
    }
    // what was written before the end is acknowledged; the rest comes again.
    // Not after a failure: the frame that failed may have left the split
    // sink's slot, and a later flush that succeeds says nothing of it (a
    // client's close racing a delivery lost that delivery this way)
    if !failed {
        flush_and_ack(
            &mut sink,
            &mut written,
            &mut receipts,
            (&delivered, through),
            deadline,
        )
        .await;
    }
    inbox.rx.close();
    while let Ok((out, _)) = inbox.rx.try_recv() {
        if let Outgoing::Delivery(d) = out {
            let _ = d.msg.ack_with(AckKind::Nak(None)).await;
        }
    }
    // before the close goes out: a client that reconnects once it sees the
    // close finds its device's position saved
    let _ = tokio::time::timeout(FINAL_SAVE, saver.save()).await;
    within(CLOSE_HANDSHAKE, sink.close()).await;
}

/// Feeds `msg` to the socket within `deadline`.
async fn fed(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    msg: Message,
    deadline: Duration,
) -> bool {
    let ok = within(deadline, sink.feed(msg)).await;
    if !ok {
        gave_up();
    }
    ok
}

/// A write that did not finish in time, or failed: the client stopped
/// reading (or went away).
fn gave_up() {
    tracing::info!("a socket write did not finish; closing the connection");
    metrics::counter!("chat_ws_write_failures_total").increment(1);
}

/// Whether a socket operation finished, and well, within `deadline`: a
/// client that stops reading fills the socket, and the write waits for it
/// no longer than that.
async fn within<E>(deadline: Duration, op: impl Future<Output = Result<(), E>>) -> bool {
    matches!(tokio::time::timeout(deadline, op).await, Ok(Ok(())))
}

/// Where a writer reports what it flushed: receipts, and the device's
/// position in the group stream.
struct Written<'a> {
    hub: &'a DeliveredHub,
    user: &'a str,
    position: &'a AtomicU64,
}

/// Most frames written before a flush (and the acks it allows).
const WRITE_BURST: usize = 64;

/// Flushes the socket, then acknowledges the newest written delivery of
/// each consumer, which covers the ones before it. False if the socket
/// failed: nothing unflushed is acknowledged, so it comes again.
async fn flush_and_ack(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    written: &mut [Option<Delivery>; 2],
    receipts: &mut HashMap<String, u64>,
    (to, through): (&Written<'_>, u64),
    deadline: Duration,
) -> bool {
    if !within(deadline, sink.flush()).await {
        return false;
    }
    to.hub.record(to.user, receipts);
    to.position.fetch_max(through, Ordering::SeqCst);
    for d in written.iter_mut().filter_map(Option::take) {
        if d.stale() {
            continue;
        }
        if let Err(e) = d.msg.ack().await {
            tracing::warn!(error = %e, "ack to jetstream failed; the event may come again");
        }
    }
    true
}

/// A group message opened for delivery: the frame every device gets.
#[derive(Clone)]
struct Opened {
    payload: bytes::Bytes,
    text: Utf8Bytes,
    group: String,
    seq: u64,
    created_at: i64,
}

/// Group messages this edge has opened recently, by stream sequence. Every
/// device of a group has its own consumer, so the same message reaches the
/// edge once per device: it is decrypted and serialised once (in a group of
/// 1,000 that was 1,000 AES-GCM opens and JSON encodings per message).
#[derive(Default)]
pub(crate) struct OpenedFrames(std::sync::Mutex<OpenedInner>);

#[derive(Default)]
struct OpenedInner {
    by_seq: HashMap<u64, Opened>,
    order: std::collections::VecDeque<u64>,
}

/// Messages kept opened; a few seconds of traffic at the rates measured.
const OPENED_FRAMES: usize = 4096;

impl OpenedFrames {
    fn get(&self, stream_seq: u64, payload: &[u8]) -> Option<Opened> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // the payload check guards against a stream recreated under the edge
        inner
            .by_seq
            .get(&stream_seq)
            .filter(|o| o.payload == payload)
            .cloned()
    }

    fn put(&self, stream_seq: u64, opened: Opened) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_seq.insert(stream_seq, opened).is_none() {
            inner.order.push_back(stream_seq);
        }
        while inner.order.len() > OPENED_FRAMES {
            if let Some(old) = inner.order.pop_front() {
                inner.by_seq.remove(&old);
            }
        }
    }
}

/// The `a_group_message` frame of a group envelope, opened once per edge.
fn open_group_message(app: &AppState, msg: &JsMessage) -> Result<Opened, String> {
    let stream_seq = msg.info().map(|i| i.stream_sequence).ok();
    let opened = match stream_seq.and_then(|seq| app.opened.get(seq, &msg.payload)) {
        Some(o) => o,
        None => {
            let o = open_envelope(app, &msg.payload)?;
            if let Some(seq) = stream_seq {
                app.opened.put(seq, o.clone());
            }
            o
        }
    };
    let age_ms = chat_domain::now_millis()
        .saturating_sub(opened.created_at)
        .max(0);
    metrics::histogram!("chat_delivery_latency_seconds").record(age_ms as f64 / 1000.0);
    Ok(opened)
}

/// The frame and group seq of a group message the live feed read: opened
/// once for every connection of the edge, and kept for catch-ups of the
/// same message.
pub(crate) fn open_live(
    app: &AppState,
    stream_seq: u64,
    payload: &bytes::Bytes,
) -> Result<(Utf8Bytes, u64), String> {
    let opened = match app.opened.get(stream_seq, payload) {
        Some(o) => o,
        None => {
            let o = open_envelope(app, payload)?;
            app.opened.put(stream_seq, o.clone());
            o
        }
    };
    let age_ms = chat_domain::now_millis()
        .saturating_sub(opened.created_at)
        .max(0);
    metrics::histogram!("chat_delivery_latency_seconds").record(age_ms as f64 / 1000.0);
    Ok((opened.text, opened.seq))
}

/// Turns a sealed envelope into an `a_group_message` frame.
fn open_envelope(app: &AppState, payload: &bytes::Bytes) -> Result<Opened, String> {
    let env: Envelope =
        serde_json::from_slice(payload).map_err(|e| format!("bad envelope: {e}"))?;
    let sealed = Sealed {
        key_id: env.key_id.clone(),
        nonce: B64.decode(&env.nonce).map_err(|e| e.to_string())?,
        ciphertext: B64.decode(&env.ciphertext).map_err(|e| e.to_string())?,
    };
    let binding = MessageBinding {
        message_id: &env.message_id,
        group_id: &env.group_id,
        sender_id: &env.sender_id,
        seq: env.seq,
    };
    let plain = app
        .keys
        .open(&sealed, &binding.aad(env.binding))
        .map_err(|e| e.to_string())?;
    let content: Value = serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    let created_at = env.created_at;
    let (group, seq) = (env.group_id.clone(), env.seq);
    let view = MessageView {
        message_id: env.message_id,
        group_id: env.group_id,
        seq: env.seq,
        sender_id: env.sender_id,
        kind: env.kind,
        text: content["text"].as_str().map(str::to_owned),
        media: serde_json::from_value(content["media"].clone()).ok(),
        created_at: format_millis(env.created_at),
    };
    let frame = to_json(&ServerFrame {
        event: event::GROUP_MESSAGE.into(),
        id: None,
        data: view,
    });
    Ok(Opened {
        payload: payload.clone(),
        text: frame.into(),
        group,
        seq,
        created_at,
    })
}

/// Streams one durable consumer to the writer until `stop`, in pull batches
/// that end within `PULL_EXPIRES`. On connect it rewinds the consumer to its
/// ack floor, so whatever an earlier session was given and did not deliver
/// comes again first and in order; on stop it simply drops the open pull.
/// The writer's bounded queue pushes back on the consumer; a client that
/// takes nothing for `SLOW_CLIENT` is closed.
async fn deliver(
    app: AppState,
    feed: Feed,
    (user, device): (UserId, DeviceId),
    tx: Outbox,
    mut stop: watch::Receiver<bool>,
    live: Option<Arc<Registration>>,
) {
    let consumer = match feed {
        Feed::User => chat_bus::user_consumer_name(&user, &device),
        Feed::Groups => chat_bus::group_consumer_name(&user, &device),
    };
    let mut backoff = Duration::from_millis(100);
    // the newest stream sequence handed to the writer: what the consumer
    // gives again after a rewind is acknowledged, not written twice
    let mut seen = Sequence::default();
    // rewinds after lost deliveries; the writer acknowledges nothing handed
    // on before the latest one
    let rewinds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // a rewind is owed (deliveries were lost): pull nothing until it is done
    let mut owed = false;
    'bind: loop {
        // the consumer handle and every call on it are boxed, so that an idle
        // delivery task holds only its open pull (7.2 KiB before)
        let c = match Box::pin(app.bus.bind(feed, &user, &device)).await {
            Ok(c) => Box::new(c),
            Err(e @ (BusError::NoConsumer(_) | BusError::Foreign(_))) => {
                evicted(&tx, &e);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer, "cannot bind consumer");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // A previous session of this device (a reconnect) may still hold an
        // open pull; wait for it to end (bounded: after a crash it simply
        // expires), then rewind to the ack floor.
        // (the bind read the consumer's state: no other call when nothing
        // waits, as on most connects)
        let deadline = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
        let mut waiting = c.cached_info().num_waiting > 0;
        while waiting && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => return,
            }
            waiting = matches!(Box::pin(c.get_info()).await, Ok(info) if info.num_waiting > 0);
        }
        // read before the rewind: with nothing pending after it, the device
        // is caught up to here (see `hand_over`)
        let feed_was_at = live.as_ref().map(|l| l.hub_position());
        // the consumer sequence the next delivery must carry: every delivery
        // counts one, so a jump means deliveries that never reached this
        // edge (a NATS node died with them in flight, a pull ended as they
        // came); acknowledging past them (`AckPolicy::All`) would lose them
        seen.rebound(None);
        match Box::pin(app.bus.reset(feed, &user, &device)).await {
            Ok(rewound) => {
                seen.rebound(Some(rewound.delivered));
                owed = false;
                if let (Some(live), Some(feed_was_at), 0) = (&live, feed_was_at, rewound.pending) {
                    // nothing missed: live at once, with no further call
                    match attach(live, feed_was_at.max(seen.forwarded), &tx).await {
                        HandOver::Done => return,
                        HandOver::More | HandOver::Wait => {}
                    }
                }
            }
            Err(e) if owed => {
                // pulling now would let the next ack cover the lost ones
                tracing::warn!(error = %e, consumer, "cannot rewind consumer yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'bind;
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer, "cannot rewind consumer; redeliveries may come late");
            }
        }
        loop {
            if let Some(live) = &live {
                match Box::pin(hand_over(&c, live, seen.forwarded, &tx)).await {
                    HandOver::Done => return,
                    HandOver::More => {}
                    HandOver::Wait => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
            let batch = if live.is_some() {
                // catching up: what is there now, without waiting for more
                Box::pin(c.fetch().max_messages(PULL_BATCH).messages()).await
            } else {
                Box::pin(
                    c.batch()
                        .max_messages(PULL_BATCH)
                        .expires(PULL_EXPIRES)
                        .messages(),
                )
                .await
            };
            let mut batch = match batch {
                Ok(b) => Box::pin(b),
                Err(e) => {
                    tracing::warn!(error = %e, consumer, "cannot pull from consumer");
                    break;
                }
            };
            loop {
                let next = tokio::select! {
                    n = batch.next() => n,
                    _ = stop.changed() => return,
                };
                let msg = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, consumer, "pull batch ended early");
                        // the consumer may be gone (an evicted device); a
                        // rebind would rewind, so only look
                        if let Err(e @ (BusError::NoConsumer(_) | BusError::Foreign(_))) =
                            Box::pin(app.bus.bind(feed, &user, &device)).await
                        {
                            evicted(&tx, &e);
                            return;
                        }
                        break;
                    }
                    None => break,
                };
                let mut repeat = false;
                if let Ok(info) = msg.info() {
                    metrics::histogram!("chat_consumer_pending", "feed" => feed.label())
                        .record(info.pending as f64);
                    let (c, stream_seq) = (info.consumer_sequence, info.stream_sequence);
                    let verdict = seen.check(c, stream_seq);
                    if let Verdict::Lost { expected } = verdict {
                        metrics::counter!("chat_delivery_gaps_total", "feed" => feed.label())
                            .increment(1);
                        tracing::warn!(
                            consumer,
                            expected,
                            got = c,
                            "deliveries lost on the way; rewinding to the ack floor"
                        );
                        // nothing after the lost ones was handed on; what
                        // was is never acknowledged now (it comes again);
                        // bind again, which waits for this pull to end and
                        // rewinds
                        rewinds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        owed = true;
                        continue 'bind;
                    }
                    repeat = verdict == Verdict::Repeat;
                }
                let opened = match feed {
                    Feed::User => std::str::from_utf8(&msg.payload)
                        .map(|t| (Utf8Bytes::from(t.to_owned()), None))
                        .map_err(|e| e.to_string()),
                    Feed::Groups => {
                        open_group_message(&app, &msg).map(|o| (o.text, Some((o.group, o.seq))))
                    }
                };
                let (text, receipt) = match opened {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(consumer, error = %e, "undeliverable payload on the bus; dropping it");
                        let _ = msg.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let out = Outgoing::Delivery(Delivery {
                    text: (!repeat).then_some(text),
                    msg: Box::new(msg),
                    receipt,
                    rewinds: (
                        rewinds.load(std::sync::atomic::Ordering::SeqCst),
                        rewinds.clone(),
                    ),
                });
                match tokio::time::timeout(SLOW_CLIENT, tx.send(out)).await {
                    Ok(Ok(())) => {}
                    // the session is over
                    Ok(Err(())) => return,
                    Err(_) => {
                        tx.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                        return;
                    }
                }
            }
        }
    }
}

/// Where a catch-up stands after a look at its consumer.
enum HandOver {
    /// Attached to the live feed: the catch-up is over.
    Done,
    /// More to take from the consumer first.
    More,
    /// Try again shortly (the consumer did not answer, or the live feed is
    /// not reading yet).
    Wait,
}

/// Hands a caught-up device over to the live feed: once its consumer has
/// nothing pending, everything of its groups up to the newest stream
/// sequence handed on (`forwarded`), or up to the feed's position read
/// before the consumer was asked, is queued; the feed gives the rest.
async fn hand_over(
    c: &async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    live: &Registration,
    forwarded: u64,
    tx: &Outbox,
) -> HandOver {
    let feed_was_at = live.hub_position();
    let info = match c.get_info().await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the consumer how far it is");
            return HandOver::Wait;
        }
    };
    if info.num_pending > 0 {
        return HandOver::More;
    }
    tracing::debug!(
        feed_was_at,
        forwarded,
        floor = info.ack_floor.stream_sequence,
        "caught up; going live"
    );
    attach(live, feed_was_at.max(forwarded), tx).await
}

/// Attaches a connection caught up to stream sequence `through`.
async fn attach(live: &Registration, through: u64, tx: &Outbox) -> HandOver {
    match live.attach(through) {
        Ok(()) => {
            let _ = tx.send(Outgoing::Through(through)).await;
            HandOver::Done
        }
        Err(NotYet::Overflowed) => HandOver::More,
        Err(NotYet::NotRunning) => HandOver::Wait,
        Err(NotYet::Closed) => HandOver::Done,
    }
}

/// Saves a live connection's position into its device's group consumer:
/// every `CHECKPOINT`, and by the writer once it wrote its last frame and
/// before it answers or sends the close, so a client that reconnects after
/// the close, on any edge, resumes right after what this connection wrote
/// (after an edge crash: after the last checkpoint, and `seq` shows the
/// repeats).
pub(crate) struct Saver {
    live: Arc<Registration>,
    /// The newest group stream sequence written: everything of the
    /// device's groups up to it reached the socket.
    position: AtomicU64,
    saved: AtomicU64,
    /// One save at a time, so an older one never lands after a newer one.
    turn: tokio::sync::Mutex<()>,
    bus: chat_bus::Bus,
    user: UserId,
    device: DeviceId,
}

/// How often a live connection's position is saved.
const CHECKPOINT: Duration = Duration::from_secs(5);
/// The longest a closing connection waits for its position to be saved.
const FINAL_SAVE: Duration = Duration::from_secs(2);

impl Saver {
    async fn save(&self) {
        let _turn = self.turn.lock().await;
        let at = self.position.load(Ordering::SeqCst);
        if !self.live.attached() || at <= self.saved.load(Ordering::SeqCst) {
            return;
        }
        match self
            .bus
            .set_group_position(&self.user, &self.device, at)
            .await
        {
            Ok(()) => {
                tracing::debug!(position = at, "device position saved");
                self.saved.fetch_max(at, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the device's position; it resumes from the last one saved")
            }
        }
    }
}

/// What the delivery task knows of one consumer's deliveries: the delivery
/// count the next one must carry, and the newest stream sequence handed on.
#[derive(Debug, Default)]
struct Sequence {
    /// `None` until a delivery or a rewind sets it.
    expected: Option<u64>,
    forwarded: u64,
}

/// What to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// New: write it.
    Deliver,
    /// Handed on before (it came again after a rewind): acknowledge it in
    /// order, do not write it twice.
    Repeat,
    /// Deliveries from `expected` on never arrived: hand on nothing more and
    /// rewind, or the next acknowledgement (`AckPolicy::All`) covers them.
    Lost { expected: u64 },
}

impl Sequence {
    /// Bound again: `delivered` is the consumer's delivery count after a
    /// rewind, if one was made (otherwise the next delivery sets the count).
    fn rebound(&mut self, delivered: Option<u64>) {
        self.expected = delivered.map(|d| d + 1);
    }

    /// Checks a delivery with delivery count `consumer_seq` of the message at
    /// `stream_seq`. Every delivery, repeats included, counts one; a count
    /// lower than expected (a new consumer leader that knew less) is taken
    /// as the new baseline.
    fn check(&mut self, consumer_seq: u64, stream_seq: u64) -> Verdict {
        if let Some(expected) = self.expected
            && consumer_seq > expected
        {
            return Verdict::Lost { expected };
        }
        self.expected = Some(consumer_seq + 1);
        if stream_seq <= self.forwarded {
            return Verdict::Repeat;
        }
        self.forwarded = stream_seq;
        Verdict::Deliver
    }
}

/// Closes a connection whose device has no consumer to deliver from, ever:
/// evicted (another device of the user took its place), or not this
/// device's.
fn evicted(tx: &Outbox, e: &BusError) {
    tracing::info!(error = %e, "device has no consumer; closing");
    tx.close_now(CLOSE_EVICTED, "device evicted; reconnect");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_deliveries_are_delivered() {
        let mut s = Sequence::default();
        // the first one sets the count when no rewind did
        assert_eq!(s.check(7, 100), Verdict::Deliver);
        assert_eq!(s.check(8, 105), Verdict::Deliver);
        assert_eq!(s.check(9, 106), Verdict::Deliver);
    }

    #[test]
    fn a_jump_in_the_delivery_count_is_a_loss_and_hands_nothing_on() {
        let mut s = Sequence::default();
        s.rebound(Some(0));
        assert_eq!(s.check(1, 10), Verdict::Deliver);
        // delivery 2 went astray; 3 must not be written (its ack would cover 2)
        assert_eq!(s.check(3, 12), Verdict::Lost { expected: 2 });
        // nothing changed: the rewind decides what comes next
        assert_eq!(s.forwarded, 10);
    }

    #[test]
    fn after_a_rewind_what_was_handed_on_is_a_repeat_and_the_rest_is_new() {
        let mut s = Sequence::default();
        s.rebound(Some(0));
        for (c, stream) in [(1, 10), (2, 11), (3, 12)] {
            assert_eq!(s.check(c, stream), Verdict::Deliver);
        }
        // a delivery went astray; the reset reports a count of 0 again
        assert_eq!(s.check(5, 14), Verdict::Lost { expected: 4 });
        s.rebound(Some(0));
        assert_eq!(s.check(1, 11), Verdict::Repeat);
        assert_eq!(s.check(2, 12), Verdict::Repeat);
        assert_eq!(s.check(3, 13), Verdict::Deliver, "the lost one");
        assert_eq!(s.check(4, 14), Verdict::Deliver);
        // and the first delivery after a rewind is checked too: a stale pull
        // of the old session took 1 and 2
        s.rebound(Some(0));
        assert_eq!(s.check(3, 15), Verdict::Lost { expected: 1 });
    }

    #[test]
    fn a_lower_count_is_a_new_baseline_not_a_loss() {
        let mut s = Sequence::default();
        assert_eq!(s.check(50, 100), Verdict::Deliver);
        // a new consumer leader that knew of fewer deliveries gives 100 again
        assert_eq!(s.check(40, 100), Verdict::Repeat);
        assert_eq!(s.check(41, 101), Verdict::Deliver);
    }
}
