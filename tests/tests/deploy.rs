//! The deployment files stay true to the binary: every `chatd` command line
//! in `compose.yaml` is accepted by chatd's own argument parser, every
//! `CHATD_*` variable it sets is one chatd reads, and every file it mounts
//! exists. (No Docker engine runs on these machines, so this is what can be
//! checked here.)

use std::path::Path;

use clap::{CommandFactory, Parser};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn services() -> anyhow::Result<Vec<(String, Yaml)>> {
    let text = std::fs::read_to_string(root().join("compose.yaml"))?;
    let docs = YamlLoader::load_from_str(&text)?;
    let services = docs[0]["services"]
        .as_hash()
        .ok_or_else(|| anyhow::anyhow!("no services"))?;
    Ok(services
        .iter()
        .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), v.clone()))
        .collect())
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_chatd_command_line_in_compose_parses() -> anyhow::Result<()> {
    let known_env: Vec<String> = chatd::Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut roles = Vec::new();
    for (name, svc) in services()? {
        let command = strings(&svc["command"]);
        if !command.first().is_some_and(|c| c.starts_with("--role")) {
            continue;
        }
        let argv = std::iter::once("chatd".to_owned()).chain(command);
        let cli = chatd::Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        roles.push((name.clone(), cli.serve.role));
        for (key, _) in svc["environment"].as_hash().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            if key.starts_with("CHATD_") {
                assert!(
                    known_env.iter().any(|k| k == key),
                    "{name} sets {key}, which chatd does not read"
                );
            }
        }
    }
    let count = |role| roles.iter().filter(|(_, r)| *r == Some(role)).count();
    assert_eq!(count(chatd::Role::Edge), 2, "{roles:?}");
    assert_eq!(count(chatd::Role::Worker), 2, "{roles:?}");
    Ok(())
}

#[test]
fn compose_has_the_promised_services_and_its_files_exist() -> anyhow::Result<()> {
    let services = services()?;
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "nats-1",
        "nats-2",
        "nats-3",
        "mongo",
        "minio",
        "minio-bucket",
        "lb",
    ] {
        assert!(names.contains(&wanted), "no {wanted} in {names:?}");
    }
    for (name, svc) in &services {
        for volume in strings(&svc["volumes"]) {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "{name} mounts missing {source}"
                );
            }
        }
    }
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile"))?;
    assert!(
        dockerfile.contains("-p chatd"),
        "the Dockerfile builds chatd"
    );
    Ok(())
}

/// Every shipped NATS configuration (the local one and each node of the
/// compose cluster) refuses anonymous clients and wrong passwords, and lets
/// each role's user in.
#[tokio::test]
async fn every_shipped_nats_config_refuses_anonymous_clients() -> anyhow::Result<()> {
    let configs = [
        "nats/nats-server.conf",
        "nats/cluster/nats-1.conf",
        "nats/cluster/nats-2.conf",
        "nats/cluster/nats-3.conf",
    ];
    for config in configs {
        // laid out as compose mounts them: the config with auth.conf beside
        let dir = tempfile::tempdir()?;
        let text = std::fs::read_to_string(root().join(config))?;
        let store = dir.path().join("js");
        let store_dir = format!("store_dir: {store:?}");
        let text = if text.contains("store_dir: /data") {
            text.replace("store_dir: /data", &store_dir)
        } else {
            text.replace("jetstream {", &format!("jetstream {{\n  {store_dir}"))
        };
        std::fs::write(dir.path().join("nats.conf"), text)?;
        std::fs::copy(root().join("nats/auth.conf"), dir.path().join("auth.conf"))?;
        let nats = chat_stack::Nats::start_with_config(&dir.path().join("nats.conf")).await?;
        let connect = |user: Option<(&str, &str)>| {
            let mut options = async_nats::ConnectOptions::new()
                .connection_timeout(std::time::Duration::from_secs(2));
            if let Some((u, p)) = user {
                options = options.user_and_password(u.into(), p.into());
            }
            options.connect(nats.url.clone())
        };
        assert!(
            connect(None).await.is_err(),
            "{config}: anonymous connected"
        );
        assert!(
            connect(Some(("chat-edge", "wrong"))).await.is_err(),
            "{config}: a wrong password connected"
        );
        let users = &nats.users;
        for u in [&users.edge, &users.worker, &users.ops] {
            let client = connect(Some((u.user, &u.password))).await;
            assert!(client.is_ok(), "{config}: {} cannot connect", u.user);
        }
    }
    Ok(())
}
