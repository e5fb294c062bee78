//! The `chatd` command line and node assembly: parse flags (every flag also
//! from a `CHATD_*` environment variable), build the roles, run them until a
//! shutdown signal.
//!
//! A library as well as a binary so that `chat-dev` and the end-to-end tests
//! start nodes in-process through exactly the flags an operator uses.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use chat_auth::Verifier;
use chat_bus::{Bus, Definitions};
use chat_domain::{Limits, MediaPolicy};
use chat_store::Store;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// NATS-native group chat server.
#[derive(Debug, Parser)]
#[command(name = "chatd", version, about, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint an HS256 token for a user with the configured secret (local use
    /// and tests; production tokens come from your identity provider).
    Token(TokenArgs),
    /// Print a fresh encryption key entry (`ID:BASE64`) for
    /// --encryption-keys.
    Keygen {
        /// Id of the new key (letters, digits, '-', '_').
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// How many stored messages each encryption key seals (`KEY COUNT` per
    /// line): a key may leave --encryption-keys once it seals none here and
    /// the group stream's copies sealed with it have aged out.
    KeyUsage(MongoArgs),
    /// Writes every message the group stream holds into MongoDB again
    /// (idempotent), from `--from-stream-seq` or the oldest: the step after
    /// restoring MongoDB from a backup older than the streams' (OPERATIONS.md,
    /// "Backups and restore"). The workers do the writing.
    Reproject {
        #[command(flatten)]
        nats: NatsArgs,
        /// First stream sequence to write again (default: the oldest held).
        #[arg(long)]
        from_stream_seq: Option<u64>,
    },
    /// Exit 0 if `GET <url>` answers 200 within 3 s, else 1: a container
    /// health check that needs no curl in the image (for example
    /// `chatd probe http://127.0.0.1:9100/readyz`).
    Probe {
        /// `http://host:port/path`.
        url: String,
    },
}

/// `chatd key-usage`: each key id with how many stored messages it seals.
pub async fn key_usage(args: &MongoArgs) -> anyhow::Result<Vec<(String, u64)>> {
    let store = Store::connect(&args.mongodb_uri, &args.mongodb_db).await?;
    Ok(store.messages.key_usage().await?)
}

/// `chatd reproject`: rewinds the persist consumer; returns where from.
pub async fn reproject(nats: &NatsArgs, from: Option<u64>) -> anyhow::Result<u64> {
    let bus = nats.connect("chatd-reproject", nats.definitions()?).await?;
    Ok(bus.reproject(from).await?)
}

/// `chatd probe`: one plain HTTP/1.0 GET, and whether it answered 200.
pub fn probe(url: &str) -> anyhow::Result<bool> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .context("probe takes an http:// URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let timeout = Duration::from_secs(3);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200")
}

/// Where NATS is, and as whom to connect (also `chatd reproject`).
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated for a cluster.
    #[arg(long, env = "CHATD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Replicas of each JetStream stream (3 on a 3-node cluster).
    #[arg(long, env = "CHATD_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
    /// Worker: most consumers per stream (two per device). Raised on a
    /// running stream at the next start-up of a worker where nats-server
    /// allows it (OPERATIONS.md, "Changing a stream's fixed fields").
    #[arg(long, env = "CHATD_NATS_MAX_CONSUMERS", default_value_t = 200_000)]
    pub nats_max_consumers: i32,
    /// Worker: most bytes the group stream (the message log) holds, set at
    /// every start-up of a worker. Past 90 % of it in messages not yet in
    /// MongoDB, workers refuse new messages (`unavailable`) rather than let
    /// nats-server discard unpersisted ones: size it for the longest
    /// MongoDB outage to ride out at the busiest send rate.
    #[arg(long, env = "CHATD_NATS_GROUPS_MAX_BYTES", default_value_t = 8 << 30,
          value_parser = clap::value_parser!(i64).range(1 << 16..))]
    pub nats_groups_max_bytes: i64,
    /// Worker: most bytes the notification stream (`CHAT_USERS`) holds,
    /// set at every start-up of a worker. Each user keeps at most 2,000
    /// notifications; past this cap on all of them together, nats-server
    /// discards the oldest, so that notifications to made-up members
    /// cannot fill JetStream's store (and stop every stream) instead.
    #[arg(long, env = "CHATD_NATS_USERS_MAX_BYTES", default_value_t = 4 << 30,
          value_parser = clap::value_parser!(i64).range(1 << 16..))]
    pub nats_users_max_bytes: i64,
    /// Edge and worker: how long the presence record of a user who went
    /// offline is kept, in seconds (its last-seen time; past it the user
    /// reads as never seen; at most ten years). nats-server holds every key
    /// of the presence bucket in memory, so this bounds it by the users
    /// seen within it.
    #[arg(long, env = "CHATD_PRESENCE_FORGET_AFTER_SECS",
          default_value_t = chat_bus::PRESENCE_FORGET_AFTER.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub presence_forget_after_secs: u64,
    /// The NATS user this node connects as: `chat-edge` for edges,
    /// `chat-worker` for workers and `--role all` (see nats/auth.conf).
    #[arg(long, env = "CHATD_NATS_USER")]
    pub nats_user: Option<String>,
    /// The NATS user's password.
    #[arg(
        long,
        env = "CHATD_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// The CA (PEM) that signs the NATS servers' certificates. With it the
    /// connection must be TLS (never in the clear, whatever a server
    /// offers) and only that CA is trusted.
    #[arg(long, env = "CHATD_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM) for NATS servers that verify
    /// their clients (`tls { verify: true }`).
    #[arg(long, env = "CHATD_NATS_TLS_CERT", requires_all = ["nats_tls_key", "nats_ca"])]
    pub nats_tls_cert: Option<PathBuf>,
    /// The key (PEM) of --nats-tls-cert.
    #[arg(long, env = "CHATD_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    fn credentials(&self) -> Option<chat_bus::Credentials> {
        match (&self.nats_user, &self.nats_password) {
            (Some(user), password) => Some(chat_bus::Credentials {
                user: user.clone(),
                password: password.clone().unwrap_or_default(),
            }),
            (None, _) => None,
        }
    }

    /// The stream definitions, with this node's replicas and cap.
    fn definitions(&self) -> anyhow::Result<Definitions> {
        let mut defs = Definitions::load(self.nats_replicas)?;
        defs.users_stream.max_consumers = self.nats_max_consumers;
        defs.groups_stream.max_consumers = self.nats_max_consumers;
        defs.groups_stream.max_bytes = self.nats_groups_max_bytes;
        defs.users_stream.max_bytes = self.nats_users_max_bytes;
        defs.presence_forget_after = Duration::from_secs(self.presence_forget_after_secs);
        Ok(defs)
    }

    /// The credentials and TLS settings, the files checked now so that a
    /// bad one stops the node with its name rather than a connection that
    /// never comes up.
    fn access(&self) -> anyhow::Result<chat_bus::Access> {
        let tls = match &self.nats_ca {
            None => None,
            Some(ca) => {
                chat_rpc::tls::ca_pem(ca).context("--nats-ca")?;
                let client = match (&self.nats_tls_cert, &self.nats_tls_key) {
                    (Some(cert), Some(key)) => {
                        chat_rpc::tls::identity_pem(cert, key)
                            .context("--nats-tls-cert, --nats-tls-key")?;
                        Some((cert.clone(), key.clone()))
                    }
                    _ => None,
                };
                Some(chat_bus::Tls {
                    ca: ca.clone(),
                    client,
                })
            }
        };
        Ok(chat_bus::Access {
            credentials: self.credentials(),
            tls,
        })
    }

    async fn connect(&self, name: &str, defs: Definitions) -> anyhow::Result<Bus> {
        Bus::connect(&self.nats_url, name, self.access()?, defs)
            .await
            .with_context(|| format!("connecting to nats at {}", self.nats_url))
    }
}

/// Where the worker's MongoDB is (also `chatd key-usage`).
#[derive(Debug, Clone, Args)]
pub struct MongoArgs {
    /// Worker: MongoDB connection string.
    #[arg(
        long,
        env = "CHATD_MONGODB_URI",
        default_value = "mongodb://127.0.0.1:27017/?directConnection=true"
    )]
    pub mongodb_uri: String,
    /// Worker: MongoDB database name.
    #[arg(long, env = "CHATD_MONGODB_DB", default_value = "chat")]
    pub mongodb_db: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// WebSocket and REST for clients.
    Edge,
    /// gRPC services that own MongoDB and JetStream publishing.
    Worker,
    /// Both, in one process.
    All,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// User id to put in `sub`.
    #[arg(long)]
    pub user: String,
    /// Optional display name claim.
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: i64,
    /// The HS256 secret (at least 32 bytes).
    #[arg(long, env = "CHATD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
}

/// Flags of a serving node.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Which roles this process runs.
    #[arg(long, env = "CHATD_ROLE", value_enum, required = true)]
    pub role: Option<Role>,

    /// Edge: HTTP and WebSocket listen address.
    #[arg(long, env = "CHATD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Worker: gRPC listen address. Any address but loopback needs
    /// --service-secret.
    #[arg(long, env = "CHATD_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    /// The secret edges and workers share (at least 32 printable bytes):
    /// every worker call carries it and workers prove they know it. Required
    /// for a worker listening beyond loopback.
    #[arg(long, env = "CHATD_SERVICE_SECRET", hide_env_values = true)]
    pub service_secret: Option<String>,
    /// Worker: serve gRPC over TLS with this certificate chain (PEM, the
    /// worker's own first). Edges then call it at `https://` URLs with
    /// --worker-ca. TLS does not replace --service-secret.
    #[arg(long, env = "CHATD_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// Worker: the key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "CHATD_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Worker: require every edge to present a certificate signed by this
    /// CA (PEM): an edge without one cannot even open a connection.
    #[arg(long, env = "CHATD_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Edge: the CA (PEM) that signs the workers' certificates. With it
    /// every --workers URL must be `https://` and each worker must present a
    /// certificate from this CA for the URL's host (or --worker-tls-name).
    #[arg(long, env = "CHATD_WORKER_CA")]
    pub worker_ca: Option<PathBuf>,
    /// Edge: the name every worker's certificate must be for, in place of
    /// each URL's host (workers addressed by IP, say, with certificates for
    /// one service name).
    #[arg(long, env = "CHATD_WORKER_TLS_NAME", requires = "worker_ca")]
    pub worker_tls_name: Option<String>,
    /// Edge: the certificate chain (PEM) presented to workers that require
    /// one (--grpc-tls-client-ca).
    #[arg(long, env = "CHATD_WORKER_TLS_CERT", requires_all = ["worker_tls_key", "worker_ca"])]
    pub worker_tls_cert: Option<PathBuf>,
    /// Edge: the key (PEM) of --worker-tls-cert.
    #[arg(long, env = "CHATD_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// Where the operator's routes are served: `GET /metrics`, `/healthz`
    /// and, on edges, `/readyz`. Never the public listener: keep this port
    /// off the load balancer. Loopback by default (they need no token):
    /// give the private address a scraper reaches.
    #[arg(long, env = "CHATD_METRICS_LISTEN", default_value = "127.0.0.1:9100")]
    pub metrics_listen: SocketAddr,
    /// Edge: worker gRPC endpoints, comma-separated, balanced across
    /// (default with --role all: this process's own worker).
    #[arg(long, env = "CHATD_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Worker: publish a push event (`chat.push.<group>`, the CHAT_PUSH
    /// stream) for every message that members with no connection open
    /// should hear of, for a push gateway. Ids only, never content.
    #[arg(long, env = "CHATD_PUSH")]
    pub push: bool,
    /// Worker: also POST every push event to this URL (implies --push),
    /// signed with --push-webhook-secret, retried with growing delays.
    #[arg(long, env = "CHATD_PUSH_WEBHOOK_URL", requires = "push_webhook_secret")]
    pub push_webhook_url: Option<String>,
    /// Worker: the secret (at least 32 bytes) that signs webhook posts
    /// (`X-Chat-Signature: sha256=HMAC(secret, "<X-Chat-Timestamp>.<body>")`).
    #[arg(
        long,
        env = "CHATD_PUSH_WEBHOOK_SECRET",
        hide_env_values = true,
        requires = "push_webhook_url"
    )]
    pub push_webhook_secret: Option<String>,
    /// Edge: deadline of each worker call, in milliseconds.
    #[arg(long, env = "CHATD_RPC_TIMEOUT_MS", default_value_t = 10_000)]
    pub rpc_timeout_ms: u64,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub mongo: MongoArgs,

    /// HS256 secret for JWTs (at least 32 bytes). Either this or
    /// --jwt-public-key.
    #[arg(long, env = "CHATD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256, ES256 or EdDSA JWTs.
    #[arg(long, env = "CHATD_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,
    /// DEVELOPMENT ONLY: `POST /dev/token {userId}` mints a token for any
    /// user, signed with --jwt-secret, so anyone who reaches the edge can
    /// act as anyone. `scripts/dev` turns it on; never on a shared server.
    #[arg(long, env = "CHATD_DEV_TOKENS", requires = "jwt_secret",
        conflicts_with_all = ["jwt_issuer", "jwt_audience"])]
    pub dev_tokens: bool,
    /// Do not serve the web client at `/app/`.
    #[arg(long, env = "CHATD_NO_WEB_APP")]
    pub no_web_app: bool,
    /// Edge: refuse a WebSocket token in the URL (`?token=`), which proxies
    /// and load balancers may log: clients send `Authorization: Bearer` or
    /// the `bearer.` subprotocol (as the web client does).
    #[arg(long, env = "CHATD_NO_WS_QUERY_TOKEN")]
    pub no_ws_query_token: bool,
    /// More HS256 secrets accepted (comma-separated), while keys rotate:
    /// tokens signed with any of them or with --jwt-secret pass.
    #[arg(
        long,
        env = "CHATD_JWT_ACCEPT_SECRETS",
        hide_env_values = true,
        value_delimiter = ',',
        requires = "jwt_secret"
    )]
    pub jwt_accept_secrets: Vec<String>,
    /// More PEM public key files accepted (comma-separated), while keys
    /// rotate; the same algorithm as --jwt-public-key.
    #[arg(
        long,
        env = "CHATD_JWT_ACCEPT_PUBLIC_KEYS",
        value_delimiter = ',',
        requires = "jwt_public_key"
    )]
    pub jwt_accept_public_keys: Vec<PathBuf>,
    /// Algorithm of --jwt-public-key: RS256, ES256 or EdDSA.
    #[arg(long, env = "CHATD_JWT_ALGORITHM", default_value = "RS256")]
    pub jwt_algorithm: String,
    /// Tokens must carry this `iss`.
    #[arg(long, env = "CHATD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Tokens must name this audience in `aud`. Required with
    /// --jwt-public-key (unless --jwt-any-audience): an identity provider's
    /// key signs tokens for every service it serves.
    #[arg(long, env = "CHATD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// With --jwt-public-key, accept tokens whatever their `aud`: only for
    /// a key that signs tokens for this service alone.
    #[arg(
        long,
        env = "CHATD_JWT_ANY_AUDIENCE",
        requires = "jwt_public_key",
        conflicts_with = "jwt_audience"
    )]
    pub jwt_any_audience: bool,
    /// Longest token lifetime accepted, in seconds (`exp` minus `iat`, or
    /// minus now without `iat`); 0 for no limit.
    #[arg(long, env = "CHATD_JWT_MAX_LIFETIME_SECS", default_value_t = 7 * 86_400)]
    pub jwt_max_lifetime_secs: u64,
    /// Clock skew allowed on `exp`, `nbf` and the lifetime, in seconds.
    #[arg(long, env = "CHATD_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// Message encryption keys as `ID:BASE64` (32-byte AES-256 keys),
    /// comma-separated. The first encrypts new messages; all decrypt, so a
    /// rotation puts the new key first and keeps the old ones. Generate one
    /// with `chatd keygen`.
    #[arg(
        long,
        env = "CHATD_ENCRYPTION_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub encryption_keys: Vec<String>,

    /// Longest text message, in bytes of UTF-8.
    #[arg(long, env = "CHATD_MAX_TEXT_BYTES", default_value_t = Limits::default().text_bytes)]
    pub max_text_bytes: usize,
    /// Worker: age in milliseconds after which a retried send whose first
    /// attempt is not in the stream is taken as lost and published again (a
    /// publish buffered through a NATS disconnect may land until then).
    #[arg(long, env = "CHATD_RESOLVE_PENDING_AFTER_MS", default_value_t = 30_000)]
    pub resolve_pending_after_ms: u64,
    /// Worker: most new messages of one group published together as one
    /// JetStream atomic batch (group commit: what queued for the group
    /// while its previous publish was under way); 1 publishes each message
    /// on its own. Default: 64 on replicated streams (`--nats-replicas` 2
    /// or more), else 1, since nats-server stages each batch of a
    /// one-replica file stream in a file store of its own (BENCHMARKS.md).
    #[arg(long, env = "CHATD_PUBLISH_BATCH_MAX",
          value_parser = clap::value_parser!(u64).range(1..=chat_bus::MAX_BATCH as u64))]
    pub publish_batch_max: Option<u64>,
    /// Worker: how long a send's `clientMsgId` is remembered, in seconds: a
    /// retry within it returns the original message (the `CHAT_SENDS`
    /// bucket's `max_age`; one small entry per send).
    #[arg(long, env = "CHATD_IDEMPOTENCY_WINDOW_SECS", default_value_t = 24 * 3600)]
    pub idempotency_window_secs: u64,
    /// Worker: how long after sending it a sender may edit a text message,
    /// in seconds (0: messages cannot be edited). Deleting has no window.
    #[arg(long, env = "CHATD_EDIT_WINDOW_SECS", default_value_t = 3600)]
    pub edit_window_secs: u64,

    /// Worker: S3-compatible endpoint for media (e.g. http://minio:9000).
    /// Without it, media requests answer `unavailable`.
    #[arg(long, env = "CHATD_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Worker: the S3 endpoint clients reach, when it differs from
    /// --s3-endpoint (e.g. https://media.example.com); pre-signed URLs are
    /// made for it.
    #[arg(long, env = "CHATD_S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,
    /// Worker: the media bucket (never public).
    #[arg(long, env = "CHATD_S3_BUCKET", default_value = "chat-media")]
    pub s3_bucket: String,
    /// Worker: the bucket's region.
    #[arg(long, env = "CHATD_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Worker: S3 access key id.
    #[arg(long, env = "CHATD_S3_ACCESS_KEY", default_value = "")]
    pub s3_access_key: String,
    /// Worker: S3 secret access key.
    #[arg(
        long,
        env = "CHATD_S3_SECRET_KEY",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub s3_secret_key: String,
    /// Worker: seconds an upload URL stays valid.
    #[arg(long, env = "CHATD_UPLOAD_URL_TTL_SECS", default_value_t = 900)]
    pub upload_url_ttl_secs: u64,
    /// Worker: seconds a download URL stays valid.
    #[arg(long, env = "CHATD_DOWNLOAD_URL_TTL_SECS", default_value_t = 300)]
    pub download_url_ttl_secs: u64,
    /// Worker: uploads that no message uses after this many seconds are
    /// deleted.
    #[arg(
        long,
        env = "CHATD_UNREFERENCED_UPLOAD_TTL_SECS",
        default_value_t = 86_400
    )]
    pub unreferenced_upload_ttl_secs: u64,
    /// Allowed image MIME types, comma-separated.
    #[arg(long, env = "CHATD_IMAGE_TYPES", value_delimiter = ',', default_values_t = MediaPolicy::default().image_types)]
    pub image_types: Vec<String>,
    /// Allowed video MIME types, comma-separated.
    #[arg(long, env = "CHATD_VIDEO_TYPES", value_delimiter = ',', default_values_t = MediaPolicy::default().video_types)]
    pub video_types: Vec<String>,
    /// Allowed audio MIME types, comma-separated.
    #[arg(long, env = "CHATD_AUDIO_TYPES", value_delimiter = ',', default_values_t = MediaPolicy::default().audio_types)]
    pub audio_types: Vec<String>,
    /// Largest image, in bytes.
    #[arg(long, env = "CHATD_MAX_IMAGE_BYTES", default_value_t = MediaPolicy::default().image_max_bytes)]
    pub max_image_bytes: u64,
    /// Largest video, in bytes.
    #[arg(long, env = "CHATD_MAX_VIDEO_BYTES", default_value_t = MediaPolicy::default().video_max_bytes)]
    pub max_video_bytes: u64,
    /// Largest audio clip, in bytes.
    #[arg(long, env = "CHATD_MAX_AUDIO_BYTES", default_value_t = MediaPolicy::default().audio_max_bytes)]
    pub max_audio_bytes: u64,
    /// Most uploads one user may hold that no message uses yet (they stay
    /// until `--unreferenced-upload-ttl-secs`).
    #[arg(long, env = "CHATD_MAX_OPEN_UPLOADS_PER_USER", default_value_t = MediaPolicy::default().open_uploads_per_user,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_open_uploads_per_user: u64,
    /// Most bytes of the uploads one user may hold that no message uses yet.
    #[arg(long, env = "CHATD_MAX_OPEN_UPLOAD_BYTES_PER_USER", default_value_t = MediaPolicy::default().open_upload_bytes_per_user,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_open_upload_bytes_per_user: u64,

    /// Most members in one group.
    #[arg(long, env = "CHATD_MAX_GROUP_MEMBERS", default_value_t = Limits::default().group_members)]
    pub max_group_members: usize,
    /// Worker: most pinned messages in one group.
    #[arg(long, env = "CHATD_MAX_GROUP_PINS", default_value_t = Limits::default().group_pins,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub max_group_pins: usize,
    /// Worker: most valid invites of one group at once.
    #[arg(long, env = "CHATD_MAX_GROUP_INVITES", default_value_t = Limits::default().group_invites,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub max_group_invites: usize,
    /// Worker: most groups one user can be a member of; adding someone
    /// beyond it is refused.
    #[arg(long, env = "CHATD_MAX_GROUPS_PER_USER", default_value_t = chat_worker::Config::default().max_groups_per_user)]
    pub max_groups_per_user: u64,
    /// Worker: most users one user can block from adding them to groups.
    #[arg(long, env = "CHATD_MAX_BLOCKS_PER_USER", default_value_t = chat_worker::Config::default().max_blocks_per_user,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_blocks_per_user: u64,
    /// Worker: most messages one search call reads and decrypts (text is
    /// encrypted at rest, so no index can answer it); the answer's `next`
    /// continues from where it stopped.
    #[arg(long, env = "CHATD_MAX_SEARCH_SCAN", default_value_t = chat_worker::Config::default().max_search_scan,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_search_scan: u32,
    /// Worker: most members, summed over its groups, in one page of
    /// `GET /groups` (a page ends early rather than grow past it).
    #[arg(long, env = "CHATD_MAX_LISTED_MEMBERS", default_value_t = chat_worker::Config::default().max_listed_members)]
    pub max_listed_members: usize,
    /// Longest group name, in characters.
    #[arg(long, env = "CHATD_MAX_GROUP_NAME", default_value_t = Limits::default().group_name_chars)]
    pub max_group_name: usize,
    /// Longest group description, in characters.
    #[arg(long, env = "CHATD_MAX_GROUP_DESCRIPTION", default_value_t = Limits::default().group_description_chars)]
    pub max_group_description: usize,
    /// Edge: largest WebSocket frame handled, in bytes.
    #[arg(long, env = "CHATD_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Edge: most bytes queued for one WebSocket connection.
    #[arg(long, env = "CHATD_WS_OUTBOX_BYTES", default_value_t = chat_edge::Config::default().outbox_bytes)]
    pub ws_outbox_bytes: usize,
    /// Edge: milliseconds one socket write may take before the client
    /// counts as gone (closed with 1013; it resumes from its position).
    #[arg(long, env = "CHATD_WS_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub ws_write_timeout_ms: u64,
    /// Edge: a busy connection (a frame or more per this many
    /// milliseconds, sustained) that wrote less than this ago gathers its
    /// next frames until then and writes them at once: fewer socket writes,
    /// at most this much more latency (0: write whenever the queue runs
    /// dry; at most 1,000).
    #[arg(long, env = "CHATD_WS_WRITE_COALESCE_MS",
          default_value_t = chat_edge::Config::default().write_coalesce.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub ws_write_coalesce_ms: u64,
    /// Edge: live group frames per second past which its connections'
    /// coalescing window stretches to (connections writing them ÷ this),
    /// at most five times `--ws-write-coalesce-ms`, so frames share socket
    /// writes; costs latency while it is passed (0: the window never
    /// stretches).
    #[arg(long, env = "CHATD_WS_WRITE_BUDGET",
          default_value_t = chat_edge::Config::default().write_budget,
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub ws_write_budget: u64,
    /// Edge: requests per second allowed per connection.
    #[arg(long, env = "CHATD_REQUESTS_PER_SEC", default_value_t = 50.0)]
    pub requests_per_sec: f64,
    /// Edge: WebSocket requests per second of all of one user's
    /// connections on the edge together (burst twice that; 0: no limit).
    /// Default: four times `--requests-per-sec`.
    #[arg(long, env = "CHATD_USER_WS_REQUESTS_PER_SEC")]
    pub user_ws_requests_per_sec: Option<f64>,
    /// Edge: REST calls and WebSocket upgrades per second per user (burst
    /// twice that; 0: no limit).
    #[arg(long, env = "CHATD_USER_REQUESTS_PER_SEC", default_value_t = chat_edge::Config::default().user_requests_per_sec)]
    pub user_requests_per_sec: f64,
    /// Edge: requests per second per client address, before authentication
    /// (burst twice that; 0: no limit). Behind a load balancer every client
    /// shares its address: limit there instead, or raise this.
    #[arg(long, env = "CHATD_ADDRESS_REQUESTS_PER_SEC", default_value_t = chat_edge::Config::default().address_requests_per_sec)]
    pub address_requests_per_sec: f64,
    /// Edge: most client connections served at once (more wait to be
    /// accepted); keep it under the open-file limit.
    #[arg(long, env = "CHATD_MAX_CONNECTIONS", default_value_t = chat_edge::Config::default().max_connections)]
    pub max_connections: usize,
    /// Edge: most WebSocket connections one user may have open on this
    /// edge (more upgrades get 429).
    #[arg(long, env = "CHATD_MAX_CONNECTIONS_PER_USER",
          default_value_t = chat_edge::Config::default().max_connections_per_user as u64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_connections_per_user: u64,
    /// Edge: milliseconds a client may take to send a request's headers.
    #[arg(long, env = "CHATD_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Edge: milliseconds a client may take to send a request's body (at
    /// most 64 KiB); past it the request gets 408 and the connection closes.
    #[arg(long, env = "CHATD_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,

    /// Worker: most devices per user (each has a place saved in NATS); a
    /// new device beyond it evicts the user's least recently seen one.
    #[arg(long, env = "CHATD_MAX_DEVICES_PER_USER", default_value_t = chat_worker::DeviceLimits::default().max_per_user)]
    pub max_devices_per_user: usize,
    /// Days after which an idle device may be evicted by a new one.
    #[arg(long, env = "CHATD_DEVICE_IDLE_DAYS", default_value_t = 30)]
    pub device_idle_days: u64,
    /// Worker: most new devices a user may register per hour (`rate_limited`,
    /// HTTP 429, past it): each new device id costs a key in nats-server's
    /// memory, and each eviction it causes a delete marker, for 60 days.
    #[arg(long, env = "CHATD_MAX_NEW_DEVICES_PER_HOUR",
          default_value_t = chat_worker::DeviceLimits::default().new_per_hour,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_devices_per_hour: u32,

    /// Seconds to finish in-flight work after a shutdown signal.
    #[arg(long, env = "CHATD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl ServeArgs {
    fn device_idle(&self) -> Duration {
        Duration::from_secs(self.device_idle_days.max(1) * 24 * 3600)
    }

    /// The worker's TLS, if it serves over TLS.
    fn grpc_tls(&self) -> anyhow::Result<Option<chat_rpc::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.grpc_tls_cert, &self.grpc_tls_key) else {
            return Ok(None);
        };
        chat_rpc::ServerTls::from_files(cert, key, self.grpc_tls_client_ca.as_deref())
            .map(Some)
            .context("--grpc-tls-cert, --grpc-tls-key, --grpc-tls-client-ca")
    }

    /// The edge's TLS to workers, if it has a CA for them.
    fn worker_tls(&self) -> anyhow::Result<Option<chat_rpc::ClientTls>> {
        let Some(ca) = &self.worker_ca else {
            return Ok(None);
        };
        let identity = self
            .worker_tls_cert
            .as_deref()
            .zip(self.worker_tls_key.as_deref());
        chat_rpc::ClientTls::from_files(ca, identity, self.worker_tls_name.clone())
            .map(Some)
            .context("--worker-ca, --worker-tls-cert, --worker-tls-key, --worker-tls-name")
    }

    fn service_secret(&self) -> anyhow::Result<Option<chat_rpc::ServiceSecret>> {
        self.service_secret
            .as_deref()
            .map(chat_rpc::ServiceSecret::new)
            .transpose()
            .context("--service-secret")
    }

    /// Most messages per publish of a group (`--publish-batch-max`).
    fn publish_batch_max(&self) -> usize {
        match self.publish_batch_max {
            Some(n) => n as usize,
            None if self.nats.nats_replicas > 1 => chat_worker::Config::default().publish_batch_max,
            None => 1,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            group_members: self.max_group_members,
            group_name_chars: self.max_group_name,
            group_description_chars: self.max_group_description,
            text_bytes: self.max_text_bytes,
            group_pins: self.max_group_pins,
            group_invites: self.max_group_invites,
        }
    }

    /// The upload TTLs, refused if an unused upload would be deleted while
    /// its URL can still write (what it wrote then would be deleted by
    /// nothing).
    fn upload_ttls(&self) -> anyhow::Result<(Duration, Duration)> {
        if self.unreferenced_upload_ttl_secs < self.upload_url_ttl_secs {
            anyhow::bail!(
                "--unreferenced-upload-ttl-secs ({}) must be at least --upload-url-ttl-secs ({}): an unused upload would be deleted while its URL can still write",
                self.unreferenced_upload_ttl_secs,
                self.upload_url_ttl_secs
            );
        }
        Ok((
            Duration::from_secs(self.upload_url_ttl_secs),
            Duration::from_secs(self.unreferenced_upload_ttl_secs),
        ))
    }

    fn media(&self) -> anyhow::Result<MediaPolicy> {
        let policy = MediaPolicy {
            image_types: self.image_types.clone(),
            video_types: self.video_types.clone(),
            audio_types: self.audio_types.clone(),
            image_max_bytes: self.max_image_bytes,
            video_max_bytes: self.max_video_bytes,
            audio_max_bytes: self.max_audio_bytes,
            open_uploads_per_user: self.max_open_uploads_per_user,
            open_upload_bytes_per_user: self.max_open_upload_bytes_per_user,
        };
        policy
            .validate()
            .context("--image-types, --video-types or --audio-types")?;
        Ok(policy)
    }

    /// The push webhook, if configured; its URL must be http(s) and its
    /// secret at least 32 bytes.
    fn webhook(&self) -> anyhow::Result<Option<chat_worker::Webhook>> {
        let (Some(url), Some(secret)) = (&self.push_webhook_url, &self.push_webhook_secret) else {
            return Ok(None);
        };
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "--push-webhook-url must be an http:// or https:// URL"
        );
        anyhow::ensure!(
            secret.len() >= 32,
            "--push-webhook-secret must be at least 32 bytes"
        );
        Ok(Some(chat_worker::Webhook {
            url: url.clone(),
            secret: secret.clone(),
        }))
    }

    fn objects(&self) -> anyhow::Result<Option<chat_store::Objects>> {
        let Some(endpoint) = &self.s3_endpoint else {
            return Ok(None);
        };
        let config = chat_store::ObjectsConfig {
            endpoint: endpoint.clone(),
            public_endpoint: self.s3_public_endpoint.clone(),
            bucket: self.s3_bucket.clone(),
            region: self.s3_region.clone(),
            access_key: self.s3_access_key.clone(),
            secret_key: self.s3_secret_key.clone(),
        };
        Ok(Some(chat_store::Objects::new(&config)?))
    }

    fn keys(&self) -> anyhow::Result<chat_crypto::KeyRing> {
        chat_crypto::KeyRing::parse(&self.encryption_keys)
            .context("--encryption-keys (generate one with `chatd keygen`)")
    }

    fn verifier(&self) -> anyhow::Result<Verifier> {
        let public_key = |path: &PathBuf| -> anyhow::Result<Verifier> {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(Verifier::public_key(&self.jwt_algorithm, &pem)?)
        };
        let mut verifier = match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(secret), _) => Verifier::hs256(secret.as_bytes())?,
            (None, Some(_)) if self.jwt_audience.is_none() && !self.jwt_any_audience => {
                anyhow::bail!(
                    "--jwt-public-key without --jwt-audience would accept every token its \
                     issuer signs, for any service: give --jwt-audience (the `aud` your \
                     identity provider puts in this service's tokens), or \
                     --jwt-any-audience if the key signs tokens for this service alone"
                )
            }
            (None, Some(path)) => public_key(path)?,
            (None, None) => anyhow::bail!("the edge needs --jwt-secret or --jwt-public-key"),
        };
        for secret in &self.jwt_accept_secrets {
            verifier = verifier
                .also(Verifier::hs256(secret.as_bytes())?)
                .context("--jwt-accept-secrets")?;
        }
        for path in &self.jwt_accept_public_keys {
            verifier = verifier
                .also(public_key(path)?)
                .context("--jwt-accept-public-keys")?;
        }
        Ok(verifier.with_policy(&chat_auth::TokenPolicy {
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            max_lifetime_secs: Some(self.jwt_max_lifetime_secs).filter(|s| *s > 0),
            leeway_secs: self.jwt_leeway_secs,
        }))
    }
}

/// A running node: its bound addresses and a way to stop it.
pub struct Node {
    /// Where clients connect (edge).
    pub http_addr: Option<SocketAddr>,
    /// Where edges connect (worker).
    pub grpc_addr: Option<SocketAddr>,
    /// Where `/metrics` and `/readyz` are served.
    pub ops_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    died: Option<mpsc::Receiver<&'static str>>,
    grace: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("http_addr", &self.http_addr)
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

fn shutdown_signal(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

impl Node {
    /// Binds, connects and starts every role of `args`.
    pub async fn start(args: ServeArgs) -> anyhow::Result<Self> {
        let role = args.role.context("--role is required")?;
        let (stop, stop_rx) = watch::channel(false);
        let defs = args.nats.definitions()?;
        let service_secret = args.service_secret()?;
        let runs_worker = matches!(role, Role::Worker | Role::All);
        if runs_worker && service_secret.is_none() && !args.grpc_listen.ip().is_loopback() {
            anyhow::bail!(
                "the worker would listen on {} without --service-secret: anyone who reaches that \
                 port could act as any user. Set CHATD_SERVICE_SECRET (the same on every edge and \
                 worker) or listen on loopback",
                args.grpc_listen
            );
        }
        let keys = args.keys()?;
        // TLS files are checked before anything starts
        let grpc_tls = if runs_worker { args.grpc_tls()? } else { None };
        let runs_edge = matches!(role, Role::Edge | Role::All);
        let worker_tls = if runs_edge { args.worker_tls()? } else { None };
        if grpc_tls.is_some() && runs_edge && args.workers.is_empty() && worker_tls.is_none() {
            anyhow::bail!(
                "with --role all and --grpc-tls-cert, the edge calls its own worker over TLS: give \
                 it --worker-ca (the CA that signed --grpc-tls-cert), and a certificate for the \
                 address it calls (the --grpc-listen address, loopback if that is unspecified) \
                 or --worker-tls-name"
            );
        }
        raise_open_files();
        let mut tasks = Vec::new();
        let (died_tx, died) = mpsc::channel(2);
        let mut grpc_addr = None;
        let mut http_addr = None;
        let mut ops: Option<axum::Router> = None;

        // the metrics recorder, before anything records
        chat_edge::telemetry::prometheus();
        let node_name = format!("chatd-{role:?}").to_lowercase();
        let bus = args.nats.connect(&node_name, defs).await?;
        if runs_worker {
            bus.ensure_streams()
                .await
                .context("declaring jetstream streams")?;
        } else {
            // only workers may declare streams (nats/auth.conf)
            bus.wait_for_streams()
                .await
                .context("waiting for a worker to declare the jetstream streams")?;
        }

        if runs_worker {
            let store = Store::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db)
                .await
                .context("connecting to mongodb")?;
            store
                .ensure_indexes()
                .await
                .context("creating mongodb indexes")?;
            // before the listener: a bound port is taken for a serving one
            let idempotency_window = Duration::from_secs(args.idempotency_window_secs.max(60));
            let (upload_url_ttl, unreferenced_upload_ttl) = args.upload_ttls()?;
            let settle = Duration::from_millis(args.resolve_pending_after_ms);
            if !chat_bus::settle_fits(settle) {
                anyhow::bail!(
                    "--resolve-pending-after-ms must be under 12 minutes: the send log's rule for late retries needs the rest of its 15"
                );
            }
            let sends = bus
                .send_log(idempotency_window, settle)
                .await
                .context("declaring the send log")?;
            let places = bus
                .declare_places()
                .await
                .context("declaring the bucket of device places")?;
            let presence = bus
                .declare_presence()
                .await
                .context("declaring the presence bucket")?;
            let listener = TcpListener::bind(args.grpc_listen)
                .await
                .with_context(|| format!("binding {}", args.grpc_listen))?;
            grpc_addr = Some(listener.local_addr()?);
            let config = chat_worker::Config {
                limits: args.limits(),
                resolve_pending_after: Duration::from_millis(args.resolve_pending_after_ms),
                publish_batch_max: args.publish_batch_max(),
                idempotency_window,
                edit_window: Duration::from_secs(args.edit_window_secs),
                media: args.media()?,
                upload_url_ttl,
                download_url_ttl: Duration::from_secs(args.download_url_ttl_secs),
                unreferenced_upload_ttl,
                devices: chat_worker::DeviceLimits {
                    max_per_user: args.max_devices_per_user.max(1),
                    idle: args.device_idle(),
                    new_per_hour: args.max_new_devices_per_hour,
                },
                service_secret: service_secret.clone(),
                tls: grpc_tls.clone(),
                max_groups_per_user: args.max_groups_per_user,
                max_blocks_per_user: args.max_blocks_per_user,
                max_search_scan: args.max_search_scan,
                max_listed_members: args.max_listed_members.max(1),
                push: args.push,
                webhook: args.webhook()?,
                ..chat_worker::Config::default()
            };
            let shutdown = shutdown_signal(&stop_rx);
            let deps = chat_worker::Deps {
                store,
                sends,
                places,
                presence,
                bus: bus.clone(),
                keys: keys.clone(),
                objects: args.objects()?,
            };
            let died = died_tx.clone();
            tasks.push(tokio::spawn(async move {
                let result = chat_worker::serve(listener, deps, config, shutdown).await;
                let _ = died.try_send("worker");
                result.context("worker")
            }));
            tracing::info!(addr = ?grpc_addr, "worker listening");
        }

        if runs_edge {
            let mut workers = args.workers.clone();
            if workers.is_empty()
                && let Some(addr) = grpc_addr
            {
                let scheme = if grpc_tls.is_some() { "https" } else { "http" };
                // a worker listening on every address is called on loopback
                let mut addr = addr;
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                workers.push(format!("{scheme}://{addr}"));
            }
            let config = chat_edge::Config {
                workers,
                rpc_timeout: Duration::from_millis(args.rpc_timeout_ms),
                max_frame_bytes: args.max_frame_bytes,
                requests_per_sec: args.requests_per_sec,
                user_ws_requests_per_sec: args
                    .user_ws_requests_per_sec
                    .unwrap_or(args.requests_per_sec * 4.0),
                outbox_bytes: args.ws_outbox_bytes,
                user_requests_per_sec: args.user_requests_per_sec,
                address_requests_per_sec: args.address_requests_per_sec,
                header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
                body_read_timeout: Duration::from_millis(args.body_read_timeout_ms.max(1)),
                max_connections: args.max_connections,
                max_connections_per_user: args.max_connections_per_user as usize,
                write_timeout: Duration::from_millis(args.ws_write_timeout_ms.max(1)),
                write_coalesce: Duration::from_millis(args.ws_write_coalesce_ms),
                write_budget: args.ws_write_budget,
                service_secret,
                worker_tls,
                web_app: !args.no_web_app,
                ws_query_token: !args.no_ws_query_token,
                dev_token_secret: args
                    .dev_tokens
                    .then(|| args.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()))
                    .flatten(),
                ..chat_edge::Config::default()
            };
            if args.dev_tokens {
                tracing::warn!(
                    "--dev-tokens: POST /dev/token mints a token for any user; development only"
                );
            }
            let state = chat_edge::AppState::new(args.verifier()?, bus, keys, config)?;
            ops = Some(chat_edge::ops_app(state.clone()));
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            http_addr = Some(listener.local_addr()?);
            let shutdown = shutdown_signal(&stop_rx);
            let died = died_tx.clone();
            tasks.push(tokio::spawn(async move {
                let result = chat_edge::serve(listener, state, shutdown).await;
                let _ = died.try_send("edge");
                result.context("edge")
            }));
            tracing::info!(addr = ?http_addr, "edge listening");
        }

        // the operator's routes, on their own listener
        let listener = TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("binding {}", args.metrics_listen))?;
        let ops_addr = Some(listener.local_addr()?);
        let ops = ops.unwrap_or_else(chat_edge::worker_ops_app);
        let shutdown = shutdown_signal(&stop_rx);
        tasks.push(tokio::spawn(async move {
            axum::serve(listener, ops)
                .with_graceful_shutdown(shutdown)
                .await
                .context("metrics")
        }));

        Ok(Self {
            http_addr,
            grpc_addr,
            ops_addr,
            stop,
            tasks,
            died: Some(died),
            grace: Duration::from_secs(args.shutdown_grace_secs),
        })
    }

    /// Signals every role to stop and waits for them, at most the grace
    /// period; what is still running then is aborted.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut first_error = None;
        for task in self.tasks {
            let abort = task.abort_handle();
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Ok(Err(join)) if join.is_cancelled() => {}
                Ok(Err(join)) => {
                    first_error.get_or_insert(anyhow::anyhow!("task panicked: {join}"));
                }
                Err(_) => {
                    tracing::warn!("grace period over; aborting what is left");
                    abort.abort();
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs until `signal` completes or a role stops by itself (an error),
    /// then stops every role.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut died = self.died.take().context("run_until called twice")?;
        tokio::select! {
            _ = signal => {
                tracing::info!("shutdown signal received; draining");
                self.stop().await
            }
            Some(role) = died.recv() => {
                let _ = self.stop().await;
                Err(anyhow::anyhow!("the {role} role stopped unexpectedly"))
            }
        }
    }
}

/// Mints a token as `chatd token` does.
/// Raises the soft limit on open files to the hard one and logs both: every
/// WebSocket is a file, and the usual soft default (1,024) would cap an edge
/// at about a thousand connections. The hard limit is the operator's
/// (`ulimit -Hn`, compose `ulimits`, systemd `LimitNOFILE`).
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: maximum,
        maximum,
    };
    let now = if current == maximum {
        current
    } else {
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => maximum,
            Err(e) => {
                tracing::warn!(soft = ?current, hard = ?maximum, error = %e, "cannot raise the open-file limit");
                current
            }
        }
    };
    let shown = |l: Option<u64>| l.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    tracing::info!(
        open_files = %shown(now),
        hard = %shown(maximum),
        "open-file limit (each connection takes one)"
    );
    if now.is_some_and(|n| n < 65_536) {
        tracing::warn!(open_files = %shown(now), "fewer than 65,536 files may be open: raise the hard limit for many connections");
    }
}

pub fn mint(args: &TokenArgs) -> anyhow::Result<String> {
    let user = chat_domain::UserId::parse(args.user.as_str())?;
    if args.jwt_secret.len() < 32 {
        anyhow::bail!("the HS256 secret must be at least 32 bytes");
    }
    Ok(chat_auth::mint_hs256(
        args.jwt_secret.as_bytes(),
        &user,
        args.name.as_deref(),
        args.ttl,
    )?)
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_parses_and_role_is_required() {
        assert!(Cli::try_parse_from(["chatd"]).is_err());
        let cli = Cli::try_parse_from([
            "chatd",
            "--role",
            "all",
            "--workers",
            "http://a:1,http://b:2",
            "--nats-url",
            "nats://n:4222",
        ])
        .expect("parses");
        assert_eq!(cli.serve.role, Some(Role::All));
        assert_eq!(cli.serve.workers, ["http://a:1", "http://b:2"]);
        let cli = Cli::try_parse_from(["chatd", "token", "--user", "alice", "--jwt-secret", "x"])
            .expect("parses");
        assert!(matches!(cli.command, Some(Command::Token(_))));
    }

    /// `chatd <args>`'s serving flags.
    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("chatd").chain(args.iter().copied())).map(|c| c.serve)
    }

    #[test]
    fn media_type_lists_are_checked_at_start() {
        let media = |types: &str| {
            serve(&["--role", "worker", "--image-types", types])
                .expect("parses")
                .media()
        };
        assert!(media("image/png,image/avif").is_ok());
        let refused = media("image/png,image/svg+xml").expect_err("svg refused");
        assert!(
            format!("{refused:#}").contains("--image-types"),
            "{refused:#}"
        );
    }

    /// The operator's routes need no token: unless told, only this host
    /// reaches them.
    #[test]
    fn the_operator_routes_listen_on_loopback_unless_told() {
        let listen = |extra: &[&str]| {
            let mut argv = vec!["--role", "edge"];
            argv.extend_from_slice(extra);
            serve(&argv).expect("parses").metrics_listen
        };
        assert!(listen(&[]).ip().is_loopback(), "{}", listen(&[]));
        assert_eq!(
            listen(&["--metrics-listen", "0.0.0.0:9100"]).to_string(),
            "0.0.0.0:9100"
        );
    }

    #[test]
    fn an_unused_upload_outlives_its_url() {
        let ttls = |url: &str, unused: &str| {
            serve(&[
                "--role",
                "worker",
                "--upload-url-ttl-secs",
                url,
                "--unreferenced-upload-ttl-secs",
                unused,
            ])
            .expect("parses")
            .upload_ttls()
        };
        let default = serve(&["--role", "worker"]).expect("parses");
        assert!(default.upload_ttls().is_ok());
        assert!(ttls("10", "10").is_ok());
        let e = ttls("11", "10").expect_err("refused");
        assert!(e.to_string().contains("--upload-url-ttl-secs (11)"), "{e}");
    }

    #[test]
    fn an_offline_user_s_presence_is_forgotten_after_thirty_days_or_as_set() {
        let forget = |role: &str, extra: &[&str]| {
            let mut argv = vec!["--role", role];
            argv.extend_from_slice(extra);
            serve(&argv).map(|s| {
                s.nats
                    .definitions()
                    .expect("definitions")
                    .presence_forget_after
            })
        };
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(forget("edge", &[]).expect("parses"), day * 30);
        assert_eq!(forget("worker", &[]).expect("parses"), day * 30);
        let set = forget("edge", &["--presence-forget-after-secs", "3600"]).expect("parses");
        assert_eq!(set, Duration::from_secs(3600));
        assert!(forget("worker", &["--presence-forget-after-secs", "0"]).is_err());
        let ten_years = "315360000";
        assert!(forget("worker", &["--presence-forget-after-secs", ten_years]).is_ok());
        assert!(forget("worker", &["--presence-forget-after-secs", "315360001"]).is_err());
    }

    #[test]
    fn the_edge_write_flags_are_bounded_and_zero_turns_them_off() {
        let window = |ms| serve(&["--role", "edge", "--ws-write-coalesce-ms", ms]);
        let budget = |n| serve(&["--role", "edge", "--ws-write-budget", n]);
        let default = serve(&["--role", "edge"]).expect("parses");
        // the coalescing window: at most a second
        assert_eq!(window("0").expect("off").ws_write_coalesce_ms, 0);
        assert_eq!(window("1000").expect("the most").ws_write_coalesce_ms, 1000);
        assert!(window("1001").is_err());
        assert!(window("-1").is_err());
        assert_eq!(default.ws_write_coalesce_ms, 10);
        // the write budget
        assert_eq!(budget("0").expect("off").ws_write_budget, 0);
        assert_eq!(
            budget("100000000").expect("the most").ws_write_budget,
            100_000_000
        );
        assert!(budget("100000001").is_err());
        assert!(budget("-1").is_err());
        assert_eq!(default.ws_write_budget, 20_000);
    }

    /// An identity provider's key signs tokens for every service it
    /// serves: with a public key, the edge needs the audience its tokens
    /// carry, or to be told that any will do.
    #[test]
    fn a_public_key_needs_an_audience_or_an_explicit_any() {
        let dir = tempfile::tempdir().expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, key.public_key_pem()).expect("write");
        let pem = pem.to_str().expect("utf-8 path");
        let edge = |extra: &[&str]| {
            let mut argv = vec![
                "--role",
                "edge",
                "--jwt-public-key",
                pem,
                "--jwt-algorithm",
                "ES256",
            ];
            argv.extend(extra);
            serve(&argv).expect("parses").verifier()
        };
        let refused = edge(&[]).expect_err("no audience");
        assert!(refused.to_string().contains("--jwt-audience"), "{refused}");
        assert!(edge(&["--jwt-audience", "chat"]).is_ok());
        assert!(edge(&["--jwt-any-audience"]).is_ok());
        assert!(
            serve(&[
                "--role",
                "edge",
                "--jwt-public-key",
                pem,
                "--jwt-any-audience",
                "--jwt-audience",
                "chat"
            ])
            .is_err()
        );
        // the service's own secret signs for it alone
        assert!(
            serve(&[
                "--role",
                "edge",
                "--jwt-secret",
                "a-secret-of-at-least-32-bytes-0123456789"
            ])
            .expect("parses")
            .verifier()
            .is_ok()
        );
    }

    /// A TLS flag that needs another is refused without it, so that no
    /// half-given setting silently leaves a link in the clear.
    #[test]
    fn tls_flags_come_in_their_sets() {
        let cases = [
            ("worker --grpc-tls-cert c --grpc-tls-key k", true),
            ("worker --grpc-tls-cert c", false),
            ("worker --grpc-tls-key k", false),
            ("worker --grpc-tls-client-ca ca", false),
            ("edge --worker-ca ca --worker-tls-name w", true),
            ("edge --worker-tls-name w", false),
            ("edge --worker-tls-cert c --worker-tls-key k", false),
            ("edge --worker-ca ca --worker-tls-cert c", false),
            ("edge --nats-ca ca --nats-tls-cert c --nats-tls-key k", true),
            ("edge --nats-tls-cert c --nats-tls-key k", false),
            ("edge --nats-ca ca --nats-tls-key k", false),
        ];
        for (args, parses) in cases {
            let argv: Vec<&str> = ["--role"]
                .into_iter()
                .chain(args.split_whitespace())
                .collect();
            assert_eq!(serve(&argv).is_ok(), parses, "{args}");
        }
    }

    #[test]
    fn a_publish_batch_is_one_to_a_thousand_messages() {
        let most = |n: &str| {
            Cli::try_parse_from(["chatd", "--role", "worker", "--publish-batch-max", n])
                .map(|c| c.serve.publish_batch_max)
        };
        assert_eq!(most("1").expect("off"), Some(1));
        assert_eq!(most("1000").expect("the most"), Some(1000));
        assert!(most("0").is_err());
        assert!(most("1001").is_err());
        // by default, batches only where nats-server stages them cheaply
        let default = |replicas: &str| {
            Cli::try_parse_from(["chatd", "--role", "worker", "--nats-replicas", replicas])
                .expect("parses")
                .serve
                .publish_batch_max()
        };
        assert_eq!(default("1"), 1);
        assert_eq!(default("3"), 64);
        let forced = Cli::try_parse_from(["chatd", "--role", "worker", "--publish-batch-max", "8"])
            .expect("parses");
        assert_eq!(forced.serve.publish_batch_max(), 8);
    }

    #[test]
    fn the_push_webhook_needs_an_http_url_and_a_long_secret() {
        let serve = |extra: &[&str]| {
            let mut argv = vec!["chatd", "--role", "worker"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.serve)
        };
        let long = "0123456789abcdef0123456789abcdef";
        let ok = serve(&[
            "--push-webhook-url",
            "http://gw/hook",
            "--push-webhook-secret",
            long,
        ])
        .expect("parses");
        assert!(ok.webhook().expect("valid").is_some());
        assert!(
            serve(&[])
                .expect("parses")
                .webhook()
                .expect("none")
                .is_none()
        );
        // each needs the other
        assert!(serve(&["--push-webhook-url", "http://gw/hook"]).is_err());
        assert!(serve(&["--push-webhook-secret", long]).is_err());
        let short = serve(&[
            "--push-webhook-url",
            "http://gw/hook",
            "--push-webhook-secret",
            "short",
        ])
        .expect("parses");
        assert!(short.webhook().is_err());
        let ftp = serve(&[
            "--push-webhook-url",
            "ftp://gw/hook",
            "--push-webhook-secret",
            long,
        ])
        .expect("parses");
        assert!(ftp.webhook().is_err());
    }

    #[test]
    fn token_refuses_bad_users_and_short_secrets() {
        let args = |user: &str, secret: &str| TokenArgs {
            user: user.into(),
            name: None,
            ttl: 60,
            jwt_secret: secret.into(),
        };
        let secret = "0123456789abcdef0123456789abcdef";
        assert!(mint(&args("alice", secret)).is_ok());
        assert!(mint(&args("a.b", secret)).is_err());
        assert!(mint(&args("alice", "short")).is_err());
    }
}
