//! `chatd`: parse flags, start the chosen roles, run until SIGINT or SIGTERM,
//! drain within the grace period.

use clap::Parser;

/// mimalloc instead of the system allocator: at capacity in the rooms
/// benchmark glibc's malloc and free were 14 % of chatd's CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .init();
    let cli = chatd::Cli::parse();
    match cli.command {
        Some(chatd::Command::Token(args)) => {
            println!("{}", chatd::mint(&args)?);
            Ok(())
        }
        Some(chatd::Command::Keygen { id }) => {
            println!("{}", chat_crypto::KeyRing::generate_entry(&id));
            Ok(())
        }
        Some(chatd::Command::KeyUsage(args)) => {
            for (key, count) in chatd::key_usage(&args).await? {
                println!("{key} {count}");
            }
            Ok(())
        }
        Some(chatd::Command::Reproject {
            nats,
            from_stream_seq,
        }) => {
            let from = chatd::reproject(&nats, from_stream_seq).await?;
            println!(
                "the workers now write every message from stream sequence {from} into MongoDB again"
            );
            Ok(())
        }
        Some(chatd::Command::Probe { url }) => match chatd::probe(&url) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => {
                eprintln!("probe {url}: {e:#}");
                std::process::exit(1)
            }
        },
        None => {
            chatd::Node::start(cli.serve)
                .await?
                .run_until(chatd::signal())
                .await
        }
    }
}
