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
        .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), merged(v)))
        .collect())
}

/// `svc` with its `<<` merge keys applied (yaml-rust2 leaves them as they
/// are): what compose sees.
fn merged(svc: &Yaml) -> Yaml {
    let Some(own) = svc.as_hash() else {
        return svc.clone();
    };
    let mut out = yaml_rust2::yaml::Hash::new();
    let base = &svc["<<"];
    let bases: Vec<&Yaml> = match base {
        Yaml::Array(v) => v.iter().collect(),
        Yaml::Hash(_) => vec![base],
        _ => Vec::new(),
    };
    for b in bases {
        for (k, v) in merged(b).as_hash().into_iter().flatten() {
            out.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in own {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    Yaml::Hash(out)
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
        let replicas = svc["deploy"]["replicas"].as_i64().unwrap_or(1);
        roles.push((name.clone(), cli.serve.role, replicas));
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
    let count = |role| {
        roles
            .iter()
            .filter(|(_, r, _)| *r == Some(role))
            .map(|(_, _, n)| n)
            .sum::<i64>()
    };
    assert_eq!(count(chatd::Role::Edge), 2, "{roles:?}");
    assert_eq!(count(chatd::Role::Worker), 2, "{roles:?}");
    Ok(())
}

/// What an operator needs of the file: every image pinned to a version,
/// every long-running service restarted after a reboot, file limits for
/// tens of thousands of sockets, nothing but the load balancer and the S3
/// server published, and edges that find workers by one name.
#[test]
fn compose_pins_images_restarts_services_and_publishes_only_the_front() -> anyhow::Result<()> {
    for (name, svc) in services()? {
        let image = svc["image"].as_str().unwrap_or_default();
        let is_chatd = image.starts_with("chatd:");
        if !is_chatd {
            let (_, tag) = image
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{name}: image {image:?} has no tag"));
            assert!(
                tag != "latest"
                    && tag.contains('.')
                    && tag.starts_with(|c: char| c.is_ascii_digit()),
                "{name}: image {image:?} is not pinned to a version"
            );
        }
        let one_shot = name.ends_with("-bucket");
        let restart = svc["restart"].as_str().unwrap_or_default();
        assert!(
            if one_shot {
                restart == "on-failure"
            } else {
                restart == "unless-stopped"
            },
            "{name}: restart {restart:?}"
        );
        let published = !strings(&svc["ports"]).is_empty();
        assert_eq!(
            published,
            name == "lb" || name == "s3",
            "{name}: only the load balancer and the S3 server are published"
        );
        let serves_sockets = is_chatd || name == "lb" || name.starts_with("nats-");
        if serves_sockets {
            let nofile = svc["ulimits"]["nofile"]["hard"]
                .as_i64()
                .unwrap_or_default();
            assert!(nofile >= 65_536, "{name}: nofile {nofile}");
        }
    }
    let edge = services()?
        .into_iter()
        .find(|(n, _)| n == "edge")
        .map(|(_, s)| strings(&s["command"]))
        .unwrap_or_default();
    assert!(
        edge.iter().any(|a| a == "--workers=http://worker:50051"),
        "edges find every worker by one name: {edge:?}"
    );
    let nginx = std::fs::read_to_string(root().join("deploy/nginx.conf"))?;
    let connections: u64 = nginx
        .split("worker_connections")
        .nth(1)
        .and_then(|r| r.trim_start().split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_default();
    assert!(
        connections >= 10_000,
        "nginx worker_connections {connections}"
    );
    assert!(nginx.contains(" resolve"), "nginx looks the edges up again");
    assert!(
        nginx.contains("$uri") && !nginx.contains("$request "),
        "tokens in query strings stay out of the access log"
    );
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
        "s3",
        "s3-bucket",
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

/// A worker starts on streams whose fields differ from the definitions in
/// ways nats-server cannot change (here the storage type): it logs and uses
/// them as they are, rather than failing its start-up forever. A field the
/// server can change (`max_consumers` on the pinned version) is changed.
#[tokio::test]
async fn a_worker_starts_on_streams_whose_fixed_fields_differ() -> anyhow::Result<()> {
    let nats = chat_stack::Nats::start().await?;
    let connect = |defs: chat_bus::Definitions| {
        let user = &nats.users.worker;
        chat_bus::Bus::connect(
            &nats.url,
            "test",
            Some(chat_bus::Credentials {
                user: user.user.to_owned(),
                password: user.password.clone(),
            }),
            defs,
        )
    };
    // the group stream as an operator's earlier edit left it: in memory
    let mut edited = chat_bus::Definitions::load(1)?;
    edited.groups_stream.storage = async_nats::jetstream::stream::StorageType::Memory;
    edited.groups_stream.max_bytes = 64 << 20;
    connect(edited).await?.ensure_streams().await?;

    // the next release raises max_consumers
    let mut shipped = chat_bus::Definitions::load(1)?;
    shipped.users_stream.max_consumers = 300_000;
    shipped.groups_stream.max_consumers = 300_000;
    let bus = connect(shipped).await?;
    tokio::time::timeout(std::time::Duration::from_secs(20), bus.ensure_streams())
        .await
        .map_err(|_| anyhow::anyhow!("start-up kept retrying a change nats-server refuses"))??;
    let config = |name: &'static str| {
        let js = bus.jetstream().clone();
        async move { anyhow::Ok(js.get_stream(name).await?.info().await?.config.clone()) }
    };
    let users = config("CHAT_USERS").await?;
    assert_eq!(
        users.max_consumers, 300_000,
        "a field that can change, changed"
    );
    let groups = config("CHAT_GROUPS").await?;
    assert_eq!(
        groups.storage,
        async_nats::jetstream::stream::StorageType::Memory,
        "used as it is"
    );
    Ok(())
}
