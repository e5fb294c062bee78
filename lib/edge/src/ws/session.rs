//! One WebSocket session: the reader loop, requests to workers, errors
//! and the connection's lifecycle.

use super::*;

/// The longest a closing session waits for its tasks to end.
const DRAIN: Duration = Duration::from_secs(4);

pub(super) struct Session {
    pub(super) app: AppState,
    pub(super) me: Identity,
    pub(super) device: DeviceId,
    pub(super) tx: Outbox,
    pub(super) bucket: TokenBucket,
    /// Its place among its user's connections here, and their shared
    /// request budget.
    pub(super) counted: crate::limits::UserConnection,
    pub(super) errors_in_a_row: u32,
    /// The connection's place in the group hub: the groups it follows.
    pub(super) groups: Arc<Registration>,
    pub(super) typing: Typing,
}

impl Session {
    pub(super) async fn run(
        app: AppState,
        me: Identity,
        device: DeviceId,
        socket: WebSocket,
        opened: Opened,
    ) {
        metrics::gauge!("chat_ws_connections").increment(1);
        let Opened {
            tx,
            inbox,
            regs,
            stored,
            joined_at,
            online,
            counted,
        } = opened;
        let (sink, mut stream) = socket.split();
        let saver = Arc::new(Saver::new(
            app.places.clone(),
            (me.user_id.clone(), device.clone()),
            stored,
        ));
        let visibility = tx.visibility.clone();
        let mut writer = tokio::spawn(write_loop(
            sink,
            inbox,
            app.clone(),
            me.user_id.clone(),
            visibility.clone(),
            saver.clone(),
        ));
        let mut writer_done = false;
        tracing::debug!("connected");

        let (stop, stopped) = watch::channel(false);
        let [group_reg, user_reg] = regs.clone();
        let catch_ups = [
            (Feed::Groups, group_reg, stored.place.map(|p| p.groups)),
            (Feed::User, user_reg, stored.place.map(|p| p.users)),
        ]
        .map(|(feed, reg, place)| {
            tokio::spawn(
                CatchUpTask {
                    app: app.clone(),
                    feed,
                    user: me.user_id.clone(),
                    reg,
                    place,
                    joined_at,
                    tx: tx.clone(),
                    stop: stopped.clone(),
                    visibility: visibility.clone(),
                    saver: saver.clone(),
                }
                .run(),
            )
        });
        let config = &app.config;
        let mut session = Session {
            bucket: TokenBucket::new(config.requests_per_sec, config.request_burst),
            counted,
            app: app.clone(),
            me,
            device,
            tx,
            errors_in_a_row: 0,
            groups: regs[0].clone(),
            typing: Typing::default(),
        };
        let mut checkpoint =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECKPOINT, CHECKPOINT);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut closing = app.closing.subscribe();
        // far enough for any real token, short of overflowing an instant
        let left = session.me.time_left().unwrap_or_default();
        let expires = tokio::time::sleep(left.min(Duration::from_secs(10 * 365 * 24 * 3600)));
        tokio::pin!(expires);
        let mut device_watch = evictions::watch(&app, &session.me.user_id, &session.device);
        loop {
            let msg = tokio::select! {
                msg = stream.next() => msg,
                _ = async { drop(closing.wait_for(|c| *c).await) } => {
                    session.tx.close_now(CLOSE_RESTART, "server restarting; reconnect");
                    None
                }
                Ok(_) = device_watch.evicted.wait_for(|e| *e) => {
                    session.tx.close_now(CLOSE_EVICTED, "device evicted; reconnect");
                    None
                }
                () = &mut expires => {
                    tracing::debug!("token expired; closing");
                    session.tx.close_now(CLOSE_EXPIRED, "token expired; reconnect with a fresh one");
                    None
                }
                // the writer gave up (a client that stopped reading, a
                // broken socket): nothing more can reach this client
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    None
                }
                _ = checkpoint.tick() => {
                    let ran_out = session.typing.expired(std::time::Instant::now());
                    typing::stop_all(&session.app, &session.me.user_id, ran_out);
                    // idle connections spawn nothing
                    if saver.due().is_some() {
                        let saver = saver.clone();
                        tokio::spawn(async move { saver.save().await });
                    }
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
        // stop the catch-ups, then report what was written; the socket
        // closes as soon as the writer is done with it
        drop(stream);
        drop(device_watch);
        let _ = stop.send(true);
        // the hubs queue nothing more, and let go of the writer's queue
        for reg in &regs {
            reg.leave();
        }
        typing::stop_all(&session.app, &session.me.user_id, session.typing.drain());
        drop(session);
        let aborts = [
            catch_ups[0].abort_handle(),
            catch_ups[1].abort_handle(),
            writer.abort_handle(),
        ];
        let drain = async {
            for h in catch_ups {
                let _ = h.await;
            }
            if !writer_done {
                let _ = writer.await;
            }
        };
        if tokio::time::timeout(DRAIN, Box::pin(drain)).await.is_err() {
            // nothing of this session may outlive it
            tracing::warn!("session did not drain in time; aborting its tasks");
            for task in aborts {
                task.abort();
            }
        }
        // the user's last connection here: offline, unless elsewhere
        drop(online);
        metrics::gauge!("chat_ws_connections").decrement(1);
    }

    /// Handles one text frame; returns whether to keep the connection.
    /// Every frame counts against the rate limit, and the size is checked
    /// before anything is parsed.
    pub(super) async fn on_text(&mut self, text: &str) -> bool {
        // the connection's own budget, then its user's (all its
        // connections here together)
        let limited = !self.bucket.take() || !self.counted.take();
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

    pub(super) async fn dispatch(&mut self, name: &str, data: Value) -> Result<Value, ApiError> {
        let label = Request::EVENTS
            .into_iter()
            .find(|e| *e == name)
            .unwrap_or("unknown");
        metrics::counter!("chat_ws_requests_total", "event" => label).increment(1);
        let request = Request::parse(name, data).map_err(|e| ApiError::invalid(e.to_string()))?;
        let caller = self.me.user_id.to_string();
        let ack = match request {
            Request::NotifyCreateGroup(GroupRef { group_id }) => {
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
                ack_data(&NotifyAck {
                    group_id,
                    notified: r.notified,
                })
            }
            Request::SendGroupMessage(m) => {
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
                        reply_to: m.reply_to.unwrap_or_default(),
                    }
                )?
                .into_inner();
                ack_data(&SendAck {
                    message_id: r.message_id,
                    group_id: r.group_id,
                    seq: r.seq,
                    created_at: format_millis(r.created_at_ms),
                })
            }
            Request::AcknowledgeGroupMessage(m) => {
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
                ack_data(&AcknowledgeAck {
                    group_id: m.group_id,
                    message_id: m.message_id,
                    read_seq: r.read_seq,
                })
            }
            Request::Typing(t) => {
                let group =
                    GroupId::parse(t.group_id).map_err(|e| ApiError::invalid(e.to_string()))?;
                if !self.groups.follows(group.as_str()) {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        "you do not follow this group: subscribe_to_group first",
                    ));
                }
                let forwarded = self
                    .typing
                    .on(&group, t.state, std::time::Instant::now())
                    .map_err(|_| {
                        ApiError::new(
                            ErrorCode::RateLimited,
                            format!("typing in more than {} groups at once", typing::GROUPS_MAX),
                        )
                    })?;
                if forwarded {
                    typing::publish(&self.app, &self.me.user_id, &group, t.state).await?;
                }
                ack_data(&TypingAck {
                    group_id: group.into_string(),
                    state: t.state,
                    forwarded,
                })
            }
            Request::AddReaction(r) | Request::RemoveReaction(r) => {
                let on = name == event::ADD_REACTION;
                let reply = rpc!(
                    self.app,
                    MessagesClient,
                    react,
                    pb::ReactRequest {
                        caller,
                        group_id: r.group_id.clone(),
                        message_id: r.message_id.clone(),
                        emoji: r.emoji.clone(),
                        on,
                    }
                )?
                .into_inner();
                ack_data(&ReactionAck {
                    group_id: r.group_id,
                    message_id: r.message_id,
                    emoji: r.emoji,
                    count: reply.count,
                    reacted: on,
                })
            }
            Request::EditGroupMessage(e) => {
                let r = rpc!(
                    self.app,
                    MessagesClient,
                    edit,
                    pb::EditRequest {
                        caller,
                        group_id: e.group_id,
                        message_id: e.message_id,
                        text: e.text,
                    }
                )?
                .into_inner();
                ack_data(&change_ack(r, true))
            }
            Request::DeleteGroupMessage(d) => {
                let r = rpc!(
                    self.app,
                    MessagesClient,
                    delete,
                    pb::DeleteRequest {
                        caller,
                        group_id: d.group_id,
                        message_id: d.message_id,
                    }
                )?
                .into_inner();
                ack_data(&change_ack(r, false))
            }
            Request::SubscribeToGroup(GroupRef { group_id }) => {
                let r = rpc!(
                    self.app,
                    GroupsClient,
                    subscribe_to_group,
                    pb::GroupRequest { caller, group_id }
                )?
                .into_inner();
                ack_data(&SubscribeAck {
                    group_id: r.group_id,
                })
            }
        };
        Ok(ack)
    }

    pub(super) async fn reply_error(&mut self, id: Option<Value>, e: ApiError) -> bool {
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

    pub(super) async fn send(&self, text: String) -> bool {
        self.tx.send(Outgoing::Frame(text)).await.is_ok()
    }
}

/// Whether a read failed because the client sent more than the hard limit.
pub(super) fn too_large(e: &axum::Error) -> bool {
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
pub(super) async fn finish_close(writer: &mut JoinHandle<()>, done: bool) -> bool {
    if done {
        return true;
    }
    tokio::time::timeout(CLOSE_HANDSHAKE, writer).await.is_ok()
}

/// The request id of an oversized frame; every other field is skipped.
#[derive(Deserialize)]
pub(super) struct IdOnly {
    #[serde(default)]
    pub(super) id: Option<Value>,
}

/// Whether `id` can be a request id: a short string or number.
pub(super) fn request_id_ok(id: &Value) -> bool {
    matches!(id, Value::String(_) | Value::Number(_)) && id.to_string().len() <= MAX_REQUEST_ID_LEN
}

/// An ack's `data` as JSON (our own types always serialise).
fn ack_data<T: serde::Serialize>(ack: &T) -> Value {
    serde_json::to_value(ack).unwrap_or_default()
}

/// The ack of an edit (`edited`) or a delete.
fn change_ack(r: pb::ChangeResponse, edited: bool) -> MessageChangeAck {
    let at = Some(format_millis(r.changed_at_ms));
    MessageChangeAck {
        group_id: r.group_id,
        message_id: r.message_id,
        seq: r.seq,
        edited_at: at.clone().filter(|_| edited),
        deleted_at: at.filter(|_| !edited),
    }
}

pub(super) fn to_json<T: serde::Serialize>(frame: &ServerFrame<T>) -> String {
    // our own frames always serialise; an empty string is never sent
    serde_json::to_string(frame).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_ids_are_short_strings_or_numbers() {
        assert!(request_id_ok(&json!("r1")));
        assert!(request_id_ok(&json!(7)));
        assert!(!request_id_ok(&json!({"a": 1})));
        assert!(!request_id_ok(&json!([1])));
        assert!(request_id_ok(&json!("x".repeat(MAX_REQUEST_ID_LEN - 2))));
        assert!(!request_id_ok(&json!("x".repeat(MAX_REQUEST_ID_LEN))));
    }
}
