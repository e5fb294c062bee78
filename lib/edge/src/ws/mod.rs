//! WebSocket sessions at `/ws`, one concept per file:
//!
//! - `mod.rs`: the upgrade (token, device, session opened on a worker, the
//!   connection registered with the live feeds) and the close codes;
//! - `session`: the reader loop, requests to workers, errors, lifecycle;
//! - `outbox`: the bounded queue into the writer (and the live feeds' way in);
//! - `writer`: frames to the socket, and the device's place once flushed;
//! - `load`: the edge's socket-write budget, which stretches how long a
//!   busy connection gathers frames while the edge is over it;
//! - `catch_up`: what the device missed since its place, read on connect,
//!   and the hand-over to the live feeds (`crate::live`);
//! - `frames`: group messages opened once per edge;
//! - `receipts`: what was written, reported as delivered;
//! - `typing`: typing notices, checked and rate-limited, passed to every
//!   edge;
//! - `visibility`: where each group's history starts for the connection
//!   (groups with `joined` history).
//!
//! Nothing counts as delivered before a flush after it succeeded: what was
//! not written comes again on the next connection.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

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
use chat_bus::{Change, Envelope, Feed};
use chat_crypto::{MessageBinding, Sealed};
use chat_domain::{DeviceId, GroupId, UserId};
use chat_protocol::{
    AcknowledgeAck, ClientFrame, ErrorCode, GroupRef, MAX_REQUEST_ID_LEN, MessageChangeAck,
    MessageDeletedView, MessageUpdatedView, MessageView, NotifyAck, ReactionAck, Request, SendAck,
    ServerFrame, SessionInfo, SubscribeAck, TypingAck, event, format_millis,
};
use chat_rpc::pb;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinHandle,
};
use tracing::Instrument;

use crate::{
    ApiError, AppState,
    auth::{WS_PROTOCOL, bearer, subprotocol_bearer},
    evictions,
    limits::TokenBucket,
    live::{LiveFrame, NotYet, Registration, Restriction, SignalFrame, Sink},
    workers::rpc,
};

mod answers;
mod catch_up;
mod frames;
mod load;
mod outbox;
mod receipts;
mod recent;
mod session;
mod typing;
mod visibility;
mod writer;

pub(crate) use self::{
    answers::Answers,
    frames::{OpenedFrames, open_live},
    load::{WriteLoad, pace as pace_writes},
    receipts::{DeliveredHub, flush_delivered, report_delivered},
    writer::event_of,
};
use self::{
    answers::answered_now, catch_up::*, frames::*, outbox::*, recent::Recent, session::*,
    typing::Typing, visibility::*, writer::*,
};

/// Close code sent when a client abuses the connection (RFC 6455 1008).
pub const CLOSE_POLICY: u16 = 1008;
/// How long a closing connection waits for the client's close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);
/// Close code sent when the edge drains (RFC 6455 1012, service restart):
/// reconnect, to this or another edge.
pub const CLOSE_RESTART: u16 = 1012;
/// Read buffer of a WebSocket, allocated for every connection and the most
/// one read takes: client frames are small requests (a larger one takes
/// several reads). 4 KiB made an idle connection cost 2 KiB more.
const WS_READ_BUFFER: usize = 2 * 1024;
/// What a WebSocket's writer gathers before it writes to the socket;
/// allocated only as frames go out.
const WS_WRITE_BUFFER: usize = 4 * 1024;
/// Close code sent when the device was evicted (the user connected more
/// devices than allowed and this one was the least recently seen): its
/// position is gone; reconnecting registers it again.
pub const CLOSE_EVICTED: u16 = 4410;
/// Close code sent when the token the connection opened with expires: a
/// connection lasts no longer than its credential; reconnect with a fresh
/// token (and the same device, to lose nothing).
pub const CLOSE_EXPIRED: u16 = 4401;
/// Close code sent when a client sends a message past the hard limit
/// (RFC 6455 1009, message too big).
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// Most bytes tungstenite may hold for writing to one socket; a client that
/// does not read past it is closed (see `write_loop`).
const WS_MAX_WRITE_BUFFER: usize = 2 * 1024 * 1024;
/// Close code sent when a client cannot keep up with its deliveries.
pub const CLOSE_TOO_SLOW: u16 = 1013;

/// What the upgrade hands a session.
pub(super) struct Opened {
    tx: Outbox,
    inbox: Inbox,
    /// The connection's places in the group and notification hubs.
    regs: [Arc<Registration>; 2],
    /// The device's place as the worker read it.
    stored: chat_bus::Stored,
    /// Where the group hub was when the connection registered.
    joined_at: Option<u64>,
    /// The connection's share of its user's presence.
    online: crate::presence::Online,
    /// Counted among its user's connections here until it ends, with the
    /// request budget they share.
    counted: crate::limits::UserConnection,
}

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
    let header = bearer(&parts)
        .or_else(|| subprotocol_bearer(&parts))
        .map(str::to_owned);
    let token = match (header, q.token) {
        (Some(token), _) => token,
        (None, Some(token)) if app.config.ws_query_token => token,
        (None, Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "this server takes no token in the URL: send it as Authorization: Bearer \
                 or as the bearer.<token> WebSocket subprotocol",
            )
            .with_status(axum::http::StatusCode::UNAUTHORIZED));
        }
        (None, None) => return Err(AuthError::Missing.into()),
    };
    let me = app.verifier.verify(&token)?;
    // taken within the clock-skew leeway past its `exp`, a token would open
    // a connection only to close it (4401) at once, after the device was
    // registered: refused as expired instead
    if me.time_left().is_none() {
        return Err(AuthError::Expired.into());
    }
    if let Err(limited) = app.limits.user(&me.user_id) {
        return Ok(limited.into_response());
    }
    // counted from here until the connection ends (or the upgrade fails)
    let counted = app.limits.connection(&me.user_id)?;
    let device = match q.device {
        Some(d) => DeviceId::parse(d).map_err(|e| ApiError::invalid(e.to_string()))?,
        None => DeviceId::default_device(),
    };
    // registered before the session opens: membership changes from then
    // on are replayed over the groups the session reads
    let (tx, inbox) = Outbox::new(app.config.outbox_frames, app.config.outbox_bytes);
    // `a_session` is first on every connection: queued before any hub can
    // offer the connection a frame (a presence change came first once)
    let hello = ServerFrame {
        event: event::SESSION.to_owned(),
        id: None,
        data: SessionInfo {
            user_id: me.user_id.to_string(),
            device_id: device.to_string(),
        },
    };
    let _ = tx.send(Outgoing::Frame(to_json(&hello))).await;
    let user = me.user_id.as_str();
    let live = Arc::new(app.live.register(user, Arc::new(tx.clone())));
    let notices = Arc::new(app.notices.register(user, Arc::new(tx.clone())));
    // a connection receives its own user's notifications, nothing else
    let _ = notices.load(&[user.to_owned()]);
    // a new device starts in the group stream from here
    let joined_at = app.live.running().then(|| app.live.position());
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
    let stored = chat_bus::Stored {
        place: opened.has_place.then_some(chat_bus::Place {
            groups: opened.groups_place,
            users: opened.users_place,
        }),
        revision: opened.place_revision,
    };
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
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("session", user = %me.user_id, device = %device, conn = live.id());
            let tracker = app.sessions_running.clone();
            let online = crate::presence::Online::new(&app, &me.user_id, live.following());
            let opened = Opened {
                tx,
                inbox,
                regs: [live, notices],
                stored,
                joined_at,
                online,
                counted,
            };
            tracker.track_future(Session::run(app, me, device, socket, opened).instrument(span))
        }))
}
