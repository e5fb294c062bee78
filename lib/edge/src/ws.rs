//! WebSocket sessions at `/ws`: one reader loop and one writer task per
//! connection, plus one delivery task per durable consumer of the device.
//!
//! Deliveries are acknowledged to JetStream only after the writer has put
//! them on the socket, so a connection that drops loses nothing: what was not
//! written is handed back (nak) and comes again on the next connection.

use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message as JsMessage};
use axum::{
    extract::{
        Query, State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket},
    },
    http::request::Parts,
    response::Response,
};
use chat_auth::{AuthError, Identity};
use chat_domain::DeviceId;
use chat_protocol::{
    ClientFrame, ErrorCode, GroupRef, MAX_REQUEST_ID_LEN, ServerFrame, SessionInfo, event,
};
use chat_rpc::pb;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::Instrument;

use crate::{ApiError, AppState, auth::bearer};

/// Close code sent when a client abuses the connection (RFC 6455 1008).
pub const CLOSE_POLICY: u16 = 1008;
/// How long a closing connection waits for the client's close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);
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
        .map(str::to_owned)
        .or(q.token)
        .ok_or(AuthError::Missing)?;
    let me = app.verifier.verify(&token)?;
    let device = match q.device {
        Some(d) => DeviceId::parse(d).map_err(|e| ApiError::invalid(e.to_string()))?,
        None => DeviceId::default_device(),
    };
    let opened = app
        .sessions
        .clone()
        .open_session(pb::OpenSessionRequest {
            user_id: me.user_id.to_string(),
            device_id: device.to_string(),
            display_name: me.name.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let limit = app.config.max_ws_message_bytes;
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("session", user = %me.user_id, device = %device);
            Session::run(app, me, device, opened, socket).instrument(span)
        }))
}

/// What the writer task puts on the socket.
enum Outgoing {
    Frame(String),
    /// A delivery from JetStream, acknowledged once written.
    Delivery(String, Box<JsMessage>),
    Close(u16, &'static str),
}

struct Session {
    app: AppState,
    me: Identity,
    device: DeviceId,
    tx: mpsc::Sender<Outgoing>,
    bucket: TokenBucket,
    errors_in_a_row: u32,
    group_delivery: Option<JoinHandle<()>>,
}

impl Session {
    async fn run(
        app: AppState,
        me: Identity,
        device: DeviceId,
        opened: pb::OpenSessionResponse,
        socket: WebSocket,
    ) {
        let (sink, mut stream) = socket.split();
        let (tx, rx) = mpsc::channel(app.config.outbox_frames);
        let writer = tokio::spawn(write_loop(sink, rx));
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

        let user_delivery = tokio::spawn(deliver(
            app.clone(),
            opened.stream,
            opened.consumer,
            tx.clone(),
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
        };
        session.start_group_delivery().await;

        while let Some(msg) = stream.next().await {
            let Ok(msg) = msg else { break };
            let keep_going = match msg {
                Message::Text(text) => session.on_text(&text).await,
                Message::Binary(_) => {
                    session
                        .reply_error(
                            None,
                            ApiError::invalid(
                                "binary frames are not supported; send JSON text frames",
                            ),
                        )
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
        user_delivery.abort();
        if let Some(h) = session.group_delivery.take() {
            h.abort();
        }
        drop(session);
        let _ = writer.await;
    }

    /// Starts delivering group messages once the device's group consumer
    /// exists (after the first `subscribe_to_group`).
    async fn start_group_delivery(&mut self) {
        if self
            .group_delivery
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let filters = self
            .app
            .bus
            .group_filters(&self.me.user_id, &self.device)
            .await;
        if filters.is_ok_and(|f| !f.is_empty()) {
            let stream = self.app.bus.definitions().groups_stream.name.clone();
            let name = chat_bus::group_consumer_name(&self.me.user_id, &self.device);
            self.group_delivery = Some(tokio::spawn(deliver(
                self.app.clone(),
                stream,
                name,
                self.tx.clone(),
            )));
        }
    }

    /// Handles one text frame; returns whether to keep the connection.
    async fn on_text(&mut self, text: &str) -> bool {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let (code, message) = if text.len() > self.app.config.max_frame_bytes {
                    (
                        ErrorCode::TooLarge,
                        format!(
                            "frame is larger than {} bytes",
                            self.app.config.max_frame_bytes
                        ),
                    )
                } else {
                    (ErrorCode::Invalid, format!("malformed frame: {e}"))
                };
                return self.reply_error(None, ApiError::new(code, message)).await;
            }
        };
        let id = match frame.id {
            None | Some(Value::Null) => None,
            Some(id @ (Value::String(_) | Value::Number(_)))
                if id.to_string().len() <= MAX_REQUEST_ID_LEN =>
            {
                Some(id)
            }
            Some(_) => {
                let msg = format!(
                    "id must be a string or number of at most {MAX_REQUEST_ID_LEN} characters"
                );
                return self.reply_error(None, ApiError::invalid(msg)).await;
            }
        };
        if text.len() > self.app.config.max_frame_bytes {
            let msg = format!(
                "frame is larger than {} bytes",
                self.app.config.max_frame_bytes
            );
            return self
                .reply_error(id, ApiError::new(ErrorCode::TooLarge, msg))
                .await;
        }
        if !self.bucket.take() {
            return self
                .reply_error(
                    id,
                    ApiError::new(ErrorCode::RateLimited, "too many requests; slow down"),
                )
                .await;
        }
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
        let caller = self.me.user_id.to_string();
        match name {
            event::NOTIFY_CREATE_GROUP => {
                let GroupRef { group_id } = parse_data(data)?;
                let r = self
                    .app
                    .groups
                    .clone()
                    .notify_group_created(pb::GroupRequest {
                        caller,
                        group_id: group_id.clone(),
                    })
                    .await?
                    .into_inner();
                Ok(json!({ "groupId": group_id, "notified": r.notified }))
            }
            event::SUBSCRIBE_TO_GROUP => {
                let GroupRef { group_id } = parse_data(data)?;
                let r = self
                    .app
                    .groups
                    .clone()
                    .subscribe_to_group(pb::GroupRequest { caller, group_id })
                    .await?
                    .into_inner();
                self.start_group_delivery().await;
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
        self.errors_in_a_row += 1;
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

fn parse_data<T: serde::de::DeserializeOwned>(data: Value) -> Result<T, ApiError> {
    serde_json::from_value(data).map_err(|e| ApiError::invalid(format!("bad data: {e}")))
}

fn to_json<T: serde::Serialize>(frame: &ServerFrame<T>) -> String {
    // our own frames always serialise; an empty string is never sent
    serde_json::to_string(frame).unwrap_or_default()
}

/// Writes frames to the socket; acknowledges deliveries once written and
/// hands back those it could not write.
async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let ok = match out {
            Outgoing::Frame(text) => sink.send(Message::Text(text.into())).await.is_ok(),
            Outgoing::Delivery(text, msg) => {
                let ok = sink.send(Message::Text(text.into())).await.is_ok();
                if ok {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "ack to jetstream failed; the event may come again");
                    }
                } else {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
                ok
            }
            Outgoing::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                false
            }
        };
        if !ok {
            break;
        }
    }
    rx.close();
    while let Ok(out) = rx.try_recv() {
        if let Outgoing::Delivery(_, msg) = out {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
        }
    }
    let _ = sink.close().await;
}

/// Streams one durable consumer to the writer until the session ends;
/// reconnects to the consumer with backoff if NATS goes away.
async fn deliver(app: AppState, stream: String, consumer: String, tx: mpsc::Sender<Outgoing>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match app.bus.bind(&stream, &consumer).await {
            Ok(c) => match c.messages().await {
                Ok(mut messages) => {
                    backoff = Duration::from_millis(100);
                    while let Some(next) = messages.next().await {
                        let msg = match next {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::debug!(error = %e, consumer, "delivery stream hiccup");
                                continue;
                            }
                        };
                        let Ok(text) = std::str::from_utf8(&msg.payload).map(str::to_owned) else {
                            tracing::error!(consumer, "non-UTF-8 payload on the bus; dropping it");
                            let _ = msg.ack_with(AckKind::Term).await;
                            continue;
                        };
                        match tx.try_send(Outgoing::Delivery(text, Box::new(msg))) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(Outgoing::Delivery(_, msg))) => {
                                let _ = msg.ack_with(AckKind::Nak(None)).await;
                                let _ = tx
                                    .send(Outgoing::Close(
                                        CLOSE_TOO_SLOW,
                                        "client too slow; reconnect",
                                    ))
                                    .await;
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, consumer, "cannot pull from consumer"),
            },
            Err(e) => tracing::warn!(error = %e, consumer, "cannot bind consumer"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Per-connection request rate limit.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
