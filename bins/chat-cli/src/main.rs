//! `chat`: try a group by hand, or script one. REST for groups, history,
//! receipts and uploads; WebSocket for sending, reading and `tail`.
//! Human-readable output by default, `--json` for scripts (the server's own
//! JSON, one document or one frame per line). Errors name the server's code
//! and exit with 1 (2 for a bad command line).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use chat_protocol::{
    BlockList, BlockView, GroupPage, GroupPresence, GroupView, InviteBody, InviteList, InviteView,
    MentionPage, MessagePage, MessageStatus, MessageView, MuteBody, RestError, SearchPage, SendAck,
    UpdateGroupBody, UploadTicket,
};
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};

#[derive(Debug, Parser)]
#[command(
    name = "chat",
    version,
    about = "A command-line client of the chat server"
)]
struct Cli {
    /// The server (an edge or the load balancer).
    #[arg(long, env = "CHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A JWT; else CHAT_TOKEN, else the one `chat login` saved.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a token against the server and save it for later commands.
    Login { token: String },
    /// Mint a token for a user of a development stack (the secret
    /// `scripts/dev` prints).
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, env = "CHATD_JWT_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: i64,
    },
    /// Your groups, most recently updated first.
    Groups {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// One group with its members.
    Show { group: String },
    /// Create a group; you are its owner.
    Create {
        name: String,
        #[arg(long = "member")]
        members: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// `shared` (members see the whole history) or `joined`.
        #[arg(long)]
        history: Option<String>,
    },
    /// Rename a group or change its description, or both (owner only).
    Rename {
        group: String,
        /// The new name.
        #[arg(long, required_unless_present = "description")]
        name: Option<String>,
        /// The new description ("" clears it).
        #[arg(long)]
        description: Option<String>,
    },
    /// Stop push notifications of a group's messages, except those that
    /// mention you, for good or until a time.
    Mute {
        group: String,
        /// When the mute ends (RFC 3339, such as 2026-12-24T18:00:00Z).
        #[arg(long)]
        until: Option<String>,
    },
    /// Be pushed a group's messages again.
    Unmute { group: String },
    /// Add members (owner only).
    Add {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove a member (owner only).
    Remove { group: String, user: String },
    /// Leave a group.
    Leave { group: String },
    /// Delete a group for everyone, with its messages and media (owner
    /// only; it cannot be undone).
    DeleteGroup { group: String },
    /// Pin a message of a group (any member).
    Pin { group: String, message_id: String },
    /// Unpin a message (the member who pinned it, or the owner).
    Unpin { group: String, message_id: String },
    /// The group's pinned messages, newest pin first.
    Pins { group: String },
    /// Make an invite code for a group (owner only): whoever holds it may
    /// join with `chat join`. It is shown this once.
    Invite {
        group: String,
        /// How long it lasts, 60 s to 30 days (default: a week).
        #[arg(long)]
        expires_in_secs: Option<u64>,
        /// How many may join with it (default: no limit but the group's size).
        #[arg(long)]
        max_uses: Option<u32>,
    },
    /// A group's valid invites (owner only), newest first.
    Invites { group: String },
    /// Revoke an invite (owner only).
    RevokeInvite { group: String, invite_id: String },
    /// Join a group with an invite's code.
    Join { code: String },
    /// Send a text message.
    Send {
        group: String,
        #[arg(required = true)]
        text: Vec<String>,
        /// Retry-safe id (default: a fresh one).
        #[arg(long)]
        client_id: Option<String>,
        /// The message this one answers (its id).
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Add a reaction to a message, or take yours back with --remove.
    React {
        group: String,
        message_id: String,
        emoji: String,
        #[arg(long)]
        remove: bool,
    },
    /// Hand the group to another member (owner only).
    Owner { group: String, user: String },
    /// Who of a group's members is online, and when the others were last
    /// seen.
    Presence { group: String },
    /// The messages that mention you, newest first.
    Mentions {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Upload a file (image, video or audio) and send it.
    SendFile {
        group: String,
        path: PathBuf,
        /// The MIME type (default: from the file name).
        #[arg(long)]
        mime: Option<String>,
    },
    /// The messages whose text holds every word, ignoring case, newest
    /// first (each call reads a bounded number of messages; the answer
    /// says how to go on).
    Search {
        group: String,
        #[arg(required = true)]
        words: Vec<String>,
        /// Only messages with a lower seq (the last answer's `next`).
        #[arg(long)]
        before: Option<u64>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Messages, newest first.
    History {
        group: String,
        #[arg(long)]
        before: Option<u64>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Follow a group live: subscribe, print each message, reconnect (with
    /// the same device, so nothing is missed) until interrupted.
    Tail {
        group: String,
        /// The device to follow as (each keeps its own position).
        #[arg(long, default_value = "cli")]
        device: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Mark everything up to a message as read.
    Read { group: String, message_id: String },
    /// Replace the text of your own message (within the server's edit
    /// window).
    Edit {
        group: String,
        message_id: String,
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Delete a message (yours, or any as the group's owner).
    Delete { group: String, message_id: String },
    /// Delivered and read, per member, of one message.
    Status { group: String, message_id: String },
    /// Stop a user from adding you to groups or handing you one.
    Block { user: String },
    /// Let a blocked user add you to groups (and hand you one) again.
    Unblock { user: String },
    /// Everyone you block.
    Blocks,
}

/// The device one-shot commands (send, read, create) connect as: never the
/// one `tail` follows, so a command neither closes a tail (one connection
/// per device) nor takes the messages it waits for.
const COMMAND_DEVICE: &str = "cli-cmd";

/// A failure the server explained.
#[derive(Debug)]
struct ServerError {
    status: Option<u16>,
    code: String,
    message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} ({s}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ServerError {}

fn token_file() -> PathBuf {
    let base = std::env::var_os("CHAT_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("chat")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/chat")))
        .unwrap_or_else(|| PathBuf::from(".chat"));
    base.join("token")
}

struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
    json: bool,
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    /// One REST call: the body on success, the server's error otherwise.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.server))?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        if (200..300).contains(&status) {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        Err(match serde_json::from_str::<RestError>(&text) {
            Ok(e) => ServerError {
                status: Some(status),
                code: e.error.code.as_str().to_owned(),
                message: e.error.message,
            },
            Err(_) => ServerError {
                status: Some(status),
                code: "http".into(),
                message: text.chars().take(200).collect(),
            },
        }
        .into())
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<(Value, T)> {
        let v = self.call(reqwest::Method::GET, path, None).await?;
        let typed = serde_json::from_value(v.clone()).context("unexpected answer")?;
        Ok((v, typed))
    }

    /// Prints `v` as JSON, or `text()` for people.
    fn out(&self, v: &Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{}", text());
        }
    }

    async fn connect(&self, device: &str) -> anyhow::Result<Socket> {
        let base = self
            .server
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let mut req =
            format!("{}/ws?device={device}", base.trim_end_matches('/')).into_client_request()?;
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", self.token))?,
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("cannot open a WebSocket to {}", self.server))?;
        let mut socket = Socket { ws, next_id: 0 };
        socket.next_frame().await?; // a_session
        Ok(socket)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Socket {
    ws: Ws,
    next_id: u64,
}

impl Socket {
    async fn next_frame(&mut self) -> anyhow::Result<Value> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
                Some(Ok(Message::Close(c))) => {
                    let code = c.as_ref().map_or(0, |c| u16::from(c.code));
                    let reason = c.map(|c| c.reason.to_string()).unwrap_or_default();
                    // the device was evicted (its user has too many):
                    // reconnecting would only evict another one; or the
                    // token expired, which the same token cannot mend
                    if code == 4410 || code == 4401 {
                        return Err(ServerError {
                            status: None,
                            code: code.to_string(),
                            message: reason,
                        }
                        .into());
                    }
                    bail!("the server closed the connection ({code} {reason})")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the connection ended"),
            }
        }
    }

    /// Sends a request; its ack's data, or the server's error. Pushes that
    /// arrive meanwhile are skipped.
    async fn request(&mut self, event: &str, data: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        let frame = json!({ "event": event, "id": id, "data": data });
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await?;
        loop {
            let f = self.next_frame().await?;
            if f["id"] != id.as_str() {
                continue;
            }
            if f["event"] == "ack" {
                return Ok(f["data"].clone());
            }
            return Err(ServerError {
                status: None,
                code: f["data"]["code"].as_str().unwrap_or("error").to_owned(),
                message: f["data"]["message"].as_str().unwrap_or_default().to_owned(),
            }
            .into());
        }
    }
}

fn group_line(g: &GroupView) -> String {
    format!(
        "{}  {}  ({} members, history {}, owner {})",
        g.id, g.name, g.member_count, g.history, g.owner_id
    )
}

/// `w` as a shell reads it back: as it is if plain, else single-quoted.
fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if plain {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// `s` percent-encoded for a URL's query (every byte but the unreserved).
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn message_line(m: &MessageView) -> String {
    let body = match (&m.text, &m.media) {
        _ if m.deleted => "[deleted]".to_owned(),
        (Some(t), _) => shown(t),
        (None, Some(media)) => format!("[{} {} bytes: {}]", media.mime, media.size, media.key),
        (None, None) => String::new(),
    };
    let edited = if m.edited_at.is_some() {
        " (edited)"
    } else {
        ""
    };
    let answers = m
        .reply_to
        .as_ref()
        .map(|r| format!("(re #{}) ", r.seq))
        .unwrap_or_default();
    format!(
        "#{} {} {}: {answers}{body}{edited}",
        m.seq, m.created_at, m.sender_id
    )
}

/// Message text as printed: every line after the first indented, so that
/// no text can pass for a line of its own (a message from someone else).
/// The server refuses every other control character.
fn shown(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "\n    ")
}

/// An edit or delete as `tail` prints it.
fn change_line(f: &Value) -> Option<String> {
    let d = &f["data"];
    let seq = d["seq"].as_u64().unwrap_or_default();
    match f["event"].as_str()? {
        "a_message_updated" => Some(format!(
            "#{seq} edited by {}: {}",
            d["senderId"].as_str().unwrap_or_default(),
            shown(d["text"].as_str().unwrap_or_default())
        )),
        "a_message_deleted" => Some(format!(
            "#{seq} deleted by {}",
            d["deletedBy"].as_str().unwrap_or_default()
        )),
        _ => None,
    }
}

/// A client id nobody else picks.
fn fresh_id() -> String {
    // a UUID v7: the server keeps its send log entry briefly (PROTOCOL.md)
    chat_domain::ClientMsgId::generate().into_string()
}

fn mime_of(path: &std::path::Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        _ => return None,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token {
        user,
        secret,
        name,
        ttl_secs,
    } = &cli.command
    {
        let user = chat_domain::UserId::parse(user.as_str())?;
        println!(
            "{}",
            chat_auth::mint_hs256(secret.as_bytes(), &user, name.as_deref(), *ttl_secs)?
        );
        return Ok(());
    }
    let saved = || std::fs::read_to_string(token_file()).ok();
    let token = match &cli.command {
        Command::Login { token } => token.clone(),
        _ => cli
            .token
            .clone()
            .or_else(saved)
            .map(|t| t.trim().to_owned())
            .context("no token: pass --token, set CHAT_TOKEN, or run `chat login <token>`")?,
    };
    let c = Client {
        http: chat_http::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        server: cli.server.clone(),
        token,
        json: cli.json,
    };
    match cli.command {
        Command::Token { .. } => {}
        Command::Login { .. } => {
            c.call(reqwest::Method::GET, "/groups?limit=1", None)
                .await?;
            let file = token_file();
            save_secret(&file, &c.token)?;
            c.out(&json!({ "saved": file }), || {
                format!("token accepted; saved in {}", file.display())
            });
        }
        Command::Groups { limit } => {
            let path = format!("/groups?limit={}", limit.unwrap_or(50));
            let (v, page): (_, GroupPage) = c.get(&path).await?;
            c.out(&v, || {
                if page.groups.is_empty() {
                    return "no groups".into();
                }
                page.groups
                    .iter()
                    .map(|g| {
                        let mut line = group_line(&g.group);
                        if g.unread_count > 0 {
                            line.push_str(&format!("  [{} unread]", g.unread_count));
                        }
                        match (&g.muted, &g.muted_until) {
                            (true, Some(until)) => {
                                line.push_str(&format!("  [muted until {until}]"))
                            }
                            (true, None) => line.push_str("  [muted]"),
                            _ => {}
                        }
                        line
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Show { group } => {
            let (v, g): (_, GroupView) = c.get(&format!("/groups/{group}")).await?;
            c.out(&v, || {
                let members: Vec<String> = g
                    .members
                    .iter()
                    .map(|m| format!("  {} (since {})", m.user_id, m.joined_at))
                    .collect();
                format!("{}\n{}", group_line(&g), members.join("\n"))
            });
        }
        Command::Create {
            name,
            members,
            description,
            history,
        } => {
            let mut body = json!({ "name": name, "members": members });
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(h) = history {
                body["history"] = json!(h);
            }
            let v = c.call(reqwest::Method::POST, "/groups", Some(body)).await?;
            let g: GroupView = serde_json::from_value(v.clone())?;
            // members hear of it: live, or when they connect
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            ws.request("notify_create_group", json!({ "groupId": g.id }))
                .await?;
            c.out(&v, || format!("created {}", group_line(&g)));
        }
        Command::Rename {
            group,
            name,
            description,
        } => {
            // the contract's own type: a field left out stays as it is
            let body = serde_json::to_value(UpdateGroupBody { name, description })?;
            let v = c
                .call(
                    reqwest::Method::PATCH,
                    &format!("/groups/{group}"),
                    Some(body),
                )
                .await?;
            c.out(&v, || {
                format!(
                    "{} is now \"{}\"",
                    v["id"].as_str().unwrap_or_default(),
                    v["name"].as_str().unwrap_or_default()
                )
            });
        }
        Command::Mute { group, until } => {
            let body = serde_json::to_value(MuteBody { until })?;
            let v = c
                .call(
                    reqwest::Method::PUT,
                    &format!("/groups/{group}/mute"),
                    Some(body),
                )
                .await?;
            c.out(&v, || match v["mutedUntil"].as_str() {
                Some(until) => format!("muted until {until}"),
                None => "muted".into(),
            });
        }
        Command::Unmute { group } => {
            let v = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/groups/{group}/mute"),
                    None,
                )
                .await?;
            c.out(&v, || "unmuted".into());
        }
        Command::Add { group, users } => {
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/groups/{group}/members"),
                    Some(json!({ "userIds": users })),
                )
                .await?;
            c.out(&v, || format!("added {}", users.join(", ")));
        }
        Command::Remove { group, user } => {
            let v = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/groups/{group}/members/{user}"),
                    None,
                )
                .await?;
            c.out(&v, || format!("removed {user}"));
        }
        Command::Block { user } => {
            let v = c
                .call(reqwest::Method::PUT, &format!("/blocks/{user}"), None)
                .await?;
            let b: BlockView = serde_json::from_value(v.clone()).context("unexpected answer")?;
            c.out(&v, || format!("blocked {} (since {})", b.user_id, b.since));
        }
        Command::Unblock { user } => {
            let v = c
                .call(reqwest::Method::DELETE, &format!("/blocks/{user}"), None)
                .await?;
            c.out(&v, || format!("unblocked {user}"));
        }
        Command::Blocks => {
            let (v, list): (_, BlockList) = c.get("/blocks").await?;
            c.out(&v, || {
                list.blocks
                    .iter()
                    .map(|b| format!("{} (since {})", b.user_id, b.since))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Leave { group } => {
            let v = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/groups/{group}/members/me"),
                    None,
                )
                .await?;
            c.out(&v, || format!("left {group}"));
        }
        Command::Pin { group, message_id } => {
            let v = c
                .call(
                    reqwest::Method::PUT,
                    &format!("/groups/{group}/pins/{message_id}"),
                    None,
                )
                .await?;
            c.out(&v, || format!("pinned {message_id}"));
        }
        Command::Unpin { group, message_id } => {
            let v = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/groups/{group}/pins/{message_id}"),
                    None,
                )
                .await?;
            c.out(&v, || format!("unpinned {message_id}"));
        }
        Command::Pins { group } => {
            let v = c
                .call(reqwest::Method::GET, &format!("/groups/{group}/pins"), None)
                .await?;
            c.out(&v, || {
                let pins = v["pins"].as_array().cloned().unwrap_or_default();
                if pins.is_empty() {
                    return "no pinned messages".to_owned();
                }
                pins.iter()
                    .map(|p| {
                        shown(&format!(
                            "#{} {} (pinned by {} at {})",
                            p["seq"],
                            p["messageId"].as_str().unwrap_or_default(),
                            p["pinnedBy"].as_str().unwrap_or_default(),
                            p["pinnedAt"].as_str().unwrap_or_default()
                        ))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Invite {
            group,
            expires_in_secs,
            max_uses,
        } => {
            let body = InviteBody {
                expires_in_secs,
                max_uses,
            };
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/groups/{group}/invites"),
                    Some(serde_json::to_value(&body)?),
                )
                .await?;
            let i: InviteView = serde_json::from_value(v.clone()).context("unexpected answer")?;
            c.out(&v, || {
                format!(
                    "{}\n(invite {}, until {}; anyone with the code joins with: chat join <code>)",
                    i.code.as_deref().unwrap_or_default(),
                    i.invite_id,
                    i.expires_at
                )
            });
        }
        Command::Invites { group } => {
            let (v, list): (_, InviteList) = c.get(&format!("/groups/{group}/invites")).await?;
            c.out(&v, || {
                if list.invites.is_empty() {
                    return "no valid invites".to_owned();
                }
                list.invites
                    .iter()
                    .map(|i| {
                        let uses = match i.max_uses {
                            Some(m) => format!("{} of {m} used", i.uses),
                            None => format!("{} joined", i.uses),
                        };
                        format!("{}  {uses}, until {}", i.invite_id, i.expires_at)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::RevokeInvite { group, invite_id } => {
            let v = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/groups/{group}/invites/{invite_id}"),
                    None,
                )
                .await?;
            c.out(&v, || format!("revoked {invite_id}"));
        }
        Command::Join { code } => {
            let v = c
                .call(
                    reqwest::Method::POST,
                    "/invites/join",
                    Some(json!({ "code": code })),
                )
                .await?;
            let g: GroupView = serde_json::from_value(v.clone()).context("unexpected answer")?;
            c.out(&v, || format!("joined {}", group_line(&g)));
        }
        Command::DeleteGroup { group } => {
            let v = c
                .call(reqwest::Method::DELETE, &format!("/groups/{group}"), None)
                .await?;
            c.out(&v, || format!("deleted {group} for everyone"));
        }
        Command::Send {
            group,
            text,
            client_id,
            reply_to,
        } => {
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            let mut data = json!({
                "groupId": group,
                "clientMsgId": client_id.unwrap_or_else(fresh_id),
                "type": "text",
                "text": text.join(" "),
            });
            if let Some(id) = reply_to {
                data["replyTo"] = id.into();
            }
            let v = ws.request("send_group_message", data).await?;
            let ack: SendAck = serde_json::from_value(v.clone())?;
            c.out(&v, || format!("sent #{} ({})", ack.seq, ack.message_id));
        }
        Command::React {
            group,
            message_id,
            emoji,
            remove,
        } => {
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            let event = if remove {
                "remove_reaction"
            } else {
                "add_reaction"
            };
            let v = ws
                .request(
                    event,
                    json!({ "groupId": group, "messageId": message_id, "emoji": emoji }),
                )
                .await?;
            c.out(&v, || {
                format!(
                    "{emoji} {} ({})",
                    v["count"].as_u64().unwrap_or_default(),
                    if v["reacted"] == true {
                        "yours among them"
                    } else {
                        "not yours"
                    }
                )
            });
        }
        Command::Owner { group, user } => {
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/groups/{group}/owner"),
                    Some(json!({ "userId": user })),
                )
                .await?;
            c.out(&v, || format!("{user} owns {group} now"));
        }
        Command::Presence { group } => {
            let (v, p): (_, GroupPresence) = c.get(&format!("/groups/{group}/presence")).await?;
            c.out(&v, || {
                p.members
                    .iter()
                    .map(|m| match (m.online, &m.last_seen) {
                        (true, _) => format!("{} online", m.user_id),
                        (false, Some(at)) => format!("{} last seen {at}", m.user_id),
                        (false, None) => format!("{} never seen", m.user_id),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Mentions { limit } => {
            let path = format!("/mentions?limit={}", limit.unwrap_or(20));
            let (v, page): (_, MentionPage) = c.get(&path).await?;
            c.out(&v, || {
                if page.mentions.is_empty() {
                    return "no mentions".into();
                }
                page.mentions
                    .iter()
                    .map(|m| {
                        format!(
                            "{} #{} by {} in {}",
                            m.created_at, m.seq, m.sender_id, m.group_id
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::SendFile { group, path, mime } => {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let mime = mime
                .or_else(|| mime_of(&path).map(str::to_owned))
                .context("unknown file type: pass --mime")?;
            let kind = mime.split('/').next().unwrap_or_default().to_owned();
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/groups/{group}/uploads"),
                    Some(json!({ "type": kind, "mime": mime, "size": bytes.len() })),
                )
                .await?;
            let ticket: UploadTicket = serde_json::from_value(v)?;
            let sent = async {
                put_with_progress(&c, &ticket, bytes.clone(), !c.json).await?;
                let mut ws = c.connect(COMMAND_DEVICE).await?;
                let data = json!({
                    "groupId": group,
                    "clientMsgId": fresh_id(),
                    "type": kind,
                    "media": { "key": ticket.key, "mime": mime, "size": bytes.len() },
                });
                ws.request("send_group_message", data).await
            };
            let v = match sent.await {
                Ok(v) => v,
                Err(e) => {
                    // no message uses the upload (or, if the send got through
                    // after all, the server refuses to give it back): its
                    // object goes now rather than with the cleaner
                    let object = ticket.key.rsplit('/').next().unwrap_or_default();
                    let path = format!("/groups/{group}/uploads/{object}");
                    let _ = c.call(reqwest::Method::DELETE, &path, None).await;
                    return Err(e);
                }
            };
            let ack: SendAck = serde_json::from_value(v.clone())?;
            c.out(&v, || {
                format!("sent #{} ({}, {} bytes)", ack.seq, mime, bytes.len())
            });
        }
        Command::History {
            group,
            before,
            limit,
        } => {
            let mut path = format!("/groups/{group}/messages?limit={}", limit.unwrap_or(50));
            if let Some(b) = before {
                path.push_str(&format!("&before={b}"));
            }
            let (v, page): (_, MessagePage) = c.get(&path).await?;
            c.out(&v, || {
                page.messages
                    .iter()
                    .rev()
                    .map(message_line)
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Search {
            group,
            words,
            before,
            limit,
        } => {
            let mut path = format!(
                "/groups/{group}/search?q={}&limit={}",
                query_value(&words.join(" ")),
                limit.unwrap_or(20)
            );
            if let Some(b) = before {
                path.push_str(&format!("&before={b}"));
            }
            let (v, page): (_, SearchPage) = c.get(&path).await?;
            c.out(&v, || {
                let mut lines: Vec<String> = page.messages.iter().map(message_line).collect();
                lines.push(match page.next {
                    Some(n) => format!(
                        "older messages not searched yet: chat search {group} {} --before {n}",
                        words
                            .iter()
                            .map(|w| shell_word(w))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    None => "searched back to the first message you see".into(),
                });
                lines.join("\n")
            });
        }
        Command::Tail {
            group,
            device,
            count,
        } => tail(&c, &group, &device, count).await?,
        Command::Read { group, message_id } => {
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            let v = ws
                .request(
                    "acknowledge_group_message",
                    json!({ "groupId": group, "messageId": message_id }),
                )
                .await?;
            c.out(&v, || {
                format!("read up to #{}", v["readSeq"].as_u64().unwrap_or_default())
            });
        }
        Command::Edit {
            group,
            message_id,
            text,
        } => {
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            let v = ws
                .request(
                    "edit_group_message",
                    json!({ "groupId": group, "messageId": message_id, "text": text.join(" ") }),
                )
                .await?;
            c.out(&v, || {
                format!("edited #{}", v["seq"].as_u64().unwrap_or_default())
            });
        }
        Command::Delete { group, message_id } => {
            let mut ws = c.connect(COMMAND_DEVICE).await?;
            let v = ws
                .request(
                    "delete_group_message",
                    json!({ "groupId": group, "messageId": message_id }),
                )
                .await?;
            c.out(&v, || {
                format!("deleted #{}", v["seq"].as_u64().unwrap_or_default())
            });
        }
        Command::Status { group, message_id } => {
            let (v, s): (_, MessageStatus) = c
                .get(&format!("/groups/{group}/messages/{message_id}/status"))
                .await?;
            c.out(&v, || {
                let rows: Vec<String> = s
                    .members
                    .iter()
                    .map(|m| {
                        let state = match (m.delivered, m.read) {
                            (_, true) => "read",
                            (true, false) => "delivered",
                            _ => "sent",
                        };
                        format!("  {} {state}", m.user_id)
                    })
                    .collect();
                format!("#{} {}\n{}", s.seq, s.message_id, rows.join("\n"))
            });
        }
    }
    Ok(())
}

/// Writes `secret` to `file`, readable by its owner only (the folder too).
fn save_secret(file: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt, os::unix::fs::PermissionsExt};
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    // an older file keeps its mode: set it
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}

/// PUTs the bytes in chunks, reporting progress on stderr.
async fn put_with_progress(
    c: &Client,
    ticket: &UploadTicket,
    bytes: Vec<u8>,
    show: bool,
) -> anyhow::Result<()> {
    let total = bytes.len();
    let chunks: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let mut sent = 0usize;
    let body = futures::stream::iter(chunks.into_iter().map(move |chunk| {
        sent += chunk.len();
        if show {
            eprint!("\ruploading {}%", sent * 100 / total.max(1));
        }
        Ok::<_, std::io::Error>(chunk)
    }));
    let mut req = c
        .http
        .put(&ticket.upload_url)
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(body));
    for (k, v) in &ticket.headers {
        if !k.eq_ignore_ascii_case("content-length") {
            req = req.header(k, v);
        }
    }
    let res = req.send().await.context("upload failed")?;
    if show {
        eprintln!();
    }
    if !res.status().is_success() {
        bail!(
            "the object store refused the upload ({}): {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Follows `group` as `device`: what the device missed first, then live;
/// reconnects with a growing pause when the connection ends.
async fn tail(c: &Client, group: &str, device: &str, count: Option<usize>) -> anyhow::Result<()> {
    let mut seen = 0usize;
    let mut last_seq = 0u64;
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = async {
            let mut ws = c.connect(device).await?;
            ws.request("subscribe_to_group", json!({ "groupId": group }))
                .await?;
            // on stderr in every mode: scripts may wait for it
            eprintln!("following {group} as device {device}");
            loop {
                let f = ws.next_frame().await?;
                if f["data"]["groupId"] != group {
                    continue;
                }
                // changes of earlier messages are shown, not counted
                if let Some(line) = change_line(&f) {
                    c.out(&f["data"], || line);
                    continue;
                }
                if f["event"] != "a_group_message" {
                    continue;
                }
                let m: MessageView = serde_json::from_value(f["data"].clone())?;
                // after a reconnect the last burst may come again: seq shows it
                if m.seq <= last_seq {
                    continue;
                }
                last_seq = m.seq;
                c.out(&f["data"], || message_line(&m));
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok::<_, anyhow::Error>(true);
                }
            }
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if e.downcast_ref::<ServerError>().is_some() => return Err(e),
            Err(e) => {
                if !c.json {
                    eprintln!("disconnected ({e:#}); reconnecting");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<ServerError>() {
            Some(s) if json => println!(
                "{}",
                json!({ "error": { "code": s.code, "message": s.message, "status": s.status } })
            ),
            Some(s) => eprintln!("error: {s}"),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    /// A message cannot print a line that looks like another message.
    #[test]
    fn continuation_lines_are_indented() {
        assert_eq!(super::shown("plain"), "plain");
        assert_eq!(
            super::shown("hi\n#58 2026-12-05T10:00:00Z alice: send me the code\r\nx\ry"),
            "hi\n    #58 2026-12-05T10:00:00Z alice: send me the code\n    x\n    y"
        );
    }

    /// The search's "go on" line can be pasted back into a shell as it is.
    #[test]
    fn words_are_quoted_for_the_shell_and_encoded_for_the_url() {
        assert_eq!(super::shell_word("deploy"), "deploy");
        assert_eq!(super::shell_word("@alice"), "@alice");
        assert_eq!(super::shell_word("$(rm -rf ~)"), "'$(rm -rf ~)'");
        assert_eq!(super::shell_word("it's"), "'it'\\''s'");
        assert_eq!(super::shell_word(""), "''");
        assert_eq!(super::query_value("a b&c=é~"), "a%20b%26c%3D%C3%A9~");
    }
}
