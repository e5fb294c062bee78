//! `chat-dev`: the whole system on one machine. Starts real NATS (JetStream),
//! SecantusDB and s3s-fs on free ports with temporary data folders, then a
//! `chatd` node with every role, prints where to connect and how to get a
//! token, and runs until Ctrl-C, when it stops everything and deletes the
//! data.

use clap::Parser;

/// Run the whole chat system locally.
#[derive(Debug, Parser)]
struct Args {
    /// Address for clients (port 0 picks a free one).
    #[arg(long, env = "CHAT_DEV_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// NATS nodes: 1, or 3 for a JetStream cluster with streams replicated
    /// on every node.
    #[arg(long, env = "CHAT_DEV_NATS_NODES", default_value_t = 1)]
    nats_nodes: usize,
    /// HS256 secret for tokens (at least 32 bytes).
    #[arg(
        long,
        env = "CHATD_JWT_SECRET",
        default_value = "local-development-secret-change-me!"
    )]
    jwt_secret: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .init();
    let args = Args::parse();
    let stack = chat_stack::Stack::start_with_nats(args.nats_nodes.max(1)).await?;
    let replicas = args.nats_nodes.max(1).to_string();
    // a fresh key per run: the data is temporary too
    let key = chat_crypto::KeyRing::generate_entry("dev");
    let nats_user = stack.nats.users.worker.flags();
    let serve = chatd::Cli::try_parse_from([
        "chatd",
        "--role",
        "all",
        "--listen",
        &args.listen.to_string(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--nats-url",
        &stack.nats.url,
        "--mongodb-uri",
        &stack.mongo.uri,
        "--jwt-secret",
        &args.jwt_secret,
        "--encryption-keys",
        &key,
        "--nats-replicas",
        &replicas,
        &nats_user[0],
        &nats_user[1],
        &nats_user[2],
        &nats_user[3],
        "--s3-endpoint",
        &stack.s3.endpoint,
        "--s3-bucket",
        &stack.s3.bucket,
        "--s3-access-key",
        &stack.s3.access_key,
        "--s3-secret-key",
        &stack.s3.secret_key,
        // the web client's "sign in as" on this local stack
        "--dev-tokens",
    ])?
    .serve;
    let node = chatd::Node::start(serve).await?;
    let http = node.http_addr.map(|a| a.to_string()).unwrap_or_default();
    let ops = node.ops_addr.map(|a| a.to_string()).unwrap_or_default();
    let mint = |user: &str, name: &str| -> anyhow::Result<String> {
        Ok(chat_auth::mint_hs256(
            args.jwt_secret.as_bytes(),
            &chat_domain::UserId::parse(user)?,
            Some(name),
            86_400,
        )?)
    };
    let alice = mint("alice", "Alice")?;
    let bob = mint("bob", "Bob")?;
    println!(
        "\nchat is running\n\
         \n  Web client: http://{http}/app/  (sign in as any user name: this stack mints dev tokens)\
         \n    as alice: http://{http}/app/#token={alice}\
         \n    as bob:   http://{http}/app/#token={bob}\
         \n  REST:       http://{http}  (POST /groups, GET /groups, ...)\
         \n  WebSocket:  ws://{http}/ws?token=<jwt>&device=<id>\
         \n  Metrics:    http://{ops}/metrics  (and /readyz)\
         \n  NATS:       {} (user {}, password {})\n  MongoDB:    {}\n  S3:         {} (bucket {})\
         \n\na token for user alice (24 h):\n  {alice}\
         \n\nmint tokens for other users with:\
         \n  cargo run -q -p chatd -- token --user bob --jwt-secret '{}'\
         \n\nCtrl-C stops everything and deletes the data.\n",
        stack.nats.url,
        stack.nats.users.ops.user,
        stack.nats.users.ops.password,
        stack.mongo.uri,
        stack.s3.endpoint,
        stack.s3.bucket,
        args.jwt_secret
    );
    node.run_until(chatd::signal()).await?;
    drop(stack);
    Ok(())
}
