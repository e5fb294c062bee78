//! The deployment files stay true to the binary: every `chatd` command line
//! in `compose.yaml` is accepted by chatd's own argument parser, every
//! `CHATD_*` variable it sets is one chatd reads, and every file it mounts
//! exists. (No Docker engine runs on these machines, so this is what can be
//! checked here.)

use std::path::Path;

use anyhow::Context as _;

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
                    && tag
                        .trim_start_matches('v')
                        .starts_with(|c: char| c.is_ascii_digit()),
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
        if !one_shot {
            assert!(
                !strings(&svc["healthcheck"]["test"]).is_empty(),
                "{name}: no health check"
            );
        }
        let serves_sockets = is_chatd || name == "lb" || name.starts_with("nats-");
        if serves_sockets {
            let nofile = svc["ulimits"]["nofile"]["hard"]
                .as_i64()
                .unwrap_or_default();
            assert!(nofile >= 65_536, "{name}: nofile {nofile}");
        }
    }
    let service = |name: &str| -> anyhow::Result<Yaml> {
        services()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .with_context(|| format!("no service {name}"))
    };
    // each role gets only its own secrets
    for (role, has, lacks, nats) in [
        (
            "edge",
            "CHATD_JWT_SECRET",
            "CHATD_S3_SECRET_KEY",
            "CHAT_NATS_EDGE_PASSWORD",
        ),
        (
            "worker",
            "CHATD_S3_SECRET_KEY",
            "CHATD_JWT_SECRET",
            "CHAT_NATS_WORKER_PASSWORD",
        ),
    ] {
        let env = merged(&service(role)?["environment"]);
        assert!(!env[has].is_badvalue(), "{role} needs {has}");
        assert!(env[lacks].is_badvalue(), "{role} must not get {lacks}");
        let password = env["CHATD_NATS_PASSWORD"].as_str().unwrap_or_default();
        assert!(
            password.contains(nats),
            "{role} connects to NATS as its own user: {password}"
        );
    }
    let edge = strings(&service("edge")?["command"]);
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
    // behind lb every client has its address: the edges' per-address
    // limit is off, and lb limits per client address instead
    assert!(
        edge.iter().any(|a| a == "--address-requests-per-sec=0"),
        "{edge:?}"
    );
    for directive in [
        "limit_req_zone $binary_remote_addr",
        "limit_req zone=per_client",
        "limit_conn_zone $binary_remote_addr",
        "limit_conn conns_per_client",
        "limit_req_status 429",
    ] {
        assert!(nginx.contains(directive), "nginx lacks {directive}");
    }
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
/// each role's user in; each cluster node lets in a route with the route
/// password only.
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
            // generous: the other tests of this file load the machine
            let mut options = async_nats::ConnectOptions::new()
                .connection_timeout(std::time::Duration::from_secs(10));
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
            assert!(
                client.is_ok(),
                "{config}: {} cannot connect: {:?}",
                u.user,
                client.err()
            );
        }
        if config.starts_with("nats/cluster/") {
            assert!(
                !nats.outsider_joins(None).await?,
                "{config}: a route without credentials joined"
            );
            assert!(
                !nats.outsider_joins(Some("wrong")).await?,
                "{config}: a route with a wrong password joined"
            );
            let password = nats.users.route.password.clone();
            assert!(
                nats.outsider_joins(Some(&password)).await?,
                "{config}: a route with the password was refused"
            );
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

/// The shipped `deploy/nginx.conf`, run by a real nginx, in front of two
/// real edges (one an in-process node, one a chatd process): upgrades pass,
/// connections spread over both edges, the load balancer goes on when an
/// edge dies, the operator's routes are refused, and no token reaches the
/// access log. Only what cannot run here is changed: Docker's resolver and
/// the edges' service name become the two edges' local addresses (`resolve`
/// needs nginx 1.27.3; Debian's is older), and files go to a temporary
/// folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_config_balances_websockets_over_real_edges() -> anyhow::Result<()> {
    use chat_tests::{Cluster, PROMPTLY, eventually, token};
    let nginx = std::env::var("CHAT_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    anyhow::ensure!(
        Path::new(&nginx).exists(),
        "no nginx at {nginx}: scripts/install-deps installs Debian's (apt-get install nginx, as root)"
    );
    let c = Cluster::start(1, 1).await?;
    let mut other = c.spawn_process("edge").await?;
    let edges = [c.edge_url(0), format!("http://{}", other.http)];

    let dir = tempfile::tempdir()?;
    let shipped = std::fs::read_to_string(root().join("deploy/nginx.conf"))?;
    let servers: String = edges
        .iter()
        .map(|e| {
            format!(
                "server {} max_fails=1 fail_timeout=5s;\n",
                e.trim_start_matches("http://")
            )
        })
        .collect();
    let d = dir.path().display();
    let conf_on = |port: u16| {
        let mut conf = String::new();
        for line in shipped.lines() {
            let t = line.trim();
            if t.starts_with("resolver ") || t.starts_with("zone ") {
                continue;
            } else if t.starts_with("server edge:8080") {
                conf.push_str(&servers);
            } else if t == "listen 8080;" {
                conf.push_str(&format!("listen 127.0.0.1:{port};\n"));
            } else if t.starts_with("access_log ") {
                conf.push_str(&format!("access_log {d}/access.log chat;\n"));
                for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    conf.push_str(&format!("{temp}_temp_path {d}/{temp};\n"));
                }
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        format!("pid {d}/nginx.pid;\nerror_log {d}/error.log;\n{conf}")
    };
    // the port is picked, then nginx binds it: another test's socket may
    // take it between, and nginx exits; then again on another
    let mut attempt = 0;
    let (mut lb, front) = loop {
        attempt += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::write(dir.path().join("nginx.conf"), conf_on(port))?;
        let mut lb = std::process::Command::new(&nginx)
            .args([
                "-p",
                &format!("{d}/"),
                "-c",
                "nginx.conf",
                "-g",
                "daemon off;",
            ])
            .spawn()?;
        let front: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let up = eventually(PROMPTLY, || {
            let exited = lb.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    anyhow::bail!("nginx exited with {status}");
                }
                Ok(tokio::net::TcpStream::connect(front).await.ok().map(drop))
            }
        })
        .await;
        match up {
            Ok(()) => break (lb, front),
            Err(e) => {
                let _ = lb.kill();
                let _ = lb.wait();
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                if attempt < 3 && log.contains("Address already in use") {
                    eprintln!("nginx found its port taken; again on another");
                    continue;
                }
                return Err(e.context(format!("nginx did not start; error.log:\n{log}")));
            }
        }
    };
    let result = async {
        // WebSocket upgrades pass, spread over both edges
        let mut clients = Vec::new();
        for i in 0..6 {
            clients.push(
                chat_tests::Client::connect(&front, &token("alice"), &format!("d{i}")).await?,
            );
        }
        // the spawned edge counts alone (in-process nodes share a registry)
        let on_other = other.metric("chat_ws_connections").await?;
        assert!(
            (1.0..=5.0).contains(&on_other),
            "6 connections, {on_other} on one edge: not spread"
        );

        // the operator's routes are not served through it
        let http = chat_http::client();
        for path in ["/metrics", "/readyz"] {
            let status = http
                .get(format!("http://{front}{path}"))
                .send()
                .await?
                .status();
            assert_eq!(status, 404, "{path} through the load balancer");
        }

        // an edge dies: the next connections go to the other
        other.kill();
        for i in 0..4 {
            let ws = chat_tests::Client::connect(&front, &token("bob"), &format!("e{i}")).await?;
            ws.close().await?;
        }
        drop(clients);

        // a token passed as ?token= is not in the access log
        let secret = token("carol");
        let _ = http
            .get(format!("http://{front}/groups?token={secret}"))
            .send()
            .await?;
        // nginx writes the line after the response has gone out: wait for it
        let path = dir.path().join("access.log");
        let log = eventually(PROMPTLY, || async {
            let log = std::fs::read_to_string(&path)?;
            Ok(log.contains("/groups").then_some(log))
        })
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            e.context(format!("the request was not logged: {log}"))
        })?;
        assert!(!log.contains(&secret), "a token reached the access log");
        assert!(
            !log.contains("token="),
            "a query string reached the access log"
        );
        anyhow::Ok(())
    }
    .await;
    // SIGTERM: a SIGKILLed master leaves its worker processes behind
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &lb.id().to_string()])
        .status();
    let _ = lb.wait();
    result?;
    c.stop().await
}

/// A real Compose implementation (Debian's docker-compose, installed by
/// scripts/install-deps) accepts compose.yaml: `config` checks every key
/// against the Compose schema, the merges and the interpolation, without a
/// Docker engine.
#[test]
fn a_real_compose_implementation_accepts_compose_yaml() -> anyhow::Result<()> {
    let compose = std::env::var("CHAT_DOCKER_COMPOSE").unwrap_or_else(|_| "docker-compose".into());
    let mut cmd = std::process::Command::new(&compose);
    cmd.current_dir(root())
        .args(["-f", "compose.yaml", "config", "-q"]);
    for var in [
        "CHATD_JWT_SECRET",
        "CHATD_ENCRYPTION_KEYS",
        "CHATD_SERVICE_SECRET",
        "CHAT_NATS_EDGE_PASSWORD",
        "CHAT_NATS_WORKER_PASSWORD",
        "CHAT_NATS_OPS_PASSWORD",
        "CHAT_NATS_ROUTE_PASSWORD",
        "CHAT_S3_SECRET_KEY",
    ] {
        cmd.env(var, "checked-by-the-test");
    }
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {compose}: scripts/install-deps installs Debian's docker-compose (as root)"
        )
    })?;
    anyhow::ensure!(
        out.status.success(),
        "{compose} refuses compose.yaml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `chatd probe`, compose's health check for edges and workers: 0 for a 200,
/// 1 for anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatd_probe_passes_only_on_a_200() -> anyhow::Result<()> {
    let c = chat_tests::Cluster::start(1, 1).await?;
    let bin = chat_stack::chatd_binary()?;
    let probe = |url: String| {
        let bin = bin.clone();
        async move {
            let out = tokio::process::Command::new(bin)
                .args(["probe", &url])
                .output()
                .await?;
            anyhow::Ok(out.status.code())
        }
    };
    let ready = format!("{}/readyz", c.ops_url(0));
    let ok = chat_tests::eventually(chat_tests::PROMPTLY, || {
        let probe = probe(ready.clone());
        async move { Ok((probe.await? == Some(0)).then_some(())) }
    })
    .await;
    assert!(ok.is_ok(), "a ready edge never passed");
    assert_eq!(
        probe(format!("{}/nothing", c.ops_url(0))).await?,
        Some(1),
        "404"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    assert_eq!(
        probe(format!("http://{closed}/healthz")).await?,
        Some(1),
        "nothing listening"
    );
    c.stop().await
}

/// The shipped Prometheus config and alert rules pass promtool's checks,
/// and the rules' unit tests (`deploy/prometheus/alerts_test.yml`: each
/// alert fires on the series that should fire it, not before its `for`).
#[test]
fn prometheus_config_and_alert_rules_pass_promtool() -> anyhow::Result<()> {
    let promtool = std::env::var("CHAT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let dir = root().join("deploy/prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .current_dir(&dir)
            .args(args)
            .output()
            .with_context(|| {
                format!("cannot run {promtool}: scripts/install-deps fetches it from Debian's prometheus")
            })?;
        anyhow::ensure!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs a validator; its output on failure.
fn validated(what: &str, cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| {
        format!("cannot run the {what} validator: scripts/install-deps installs it")
    })?;
    anyhow::ensure!(
        out.status.success(),
        "the {what} validator refuses it:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `docs/openapi.json` and `docs/asyncapi.json` (kept current by tests in
/// `chat-edge`) pass real validators (openapi-spec-validator; the official
/// AsyncAPI parser), and the edge serves the same documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_documents_validate_and_are_served() -> anyhow::Result<()> {
    let openapi =
        std::env::var("CHAT_OPENAPI_VALIDATOR").unwrap_or_else(|_| "openapi-spec-validator".into());
    validated(
        "OpenAPI",
        std::process::Command::new(openapi).arg(root().join("docs/openapi.json")),
    )?;
    let parser = std::env::var("CHAT_ASYNCAPI_PARSER").unwrap_or_default();
    validated(
        "AsyncAPI",
        std::process::Command::new("node")
            .arg(root().join("scripts/validate-asyncapi.cjs"))
            .arg(parser)
            .arg(root().join("docs/asyncapi.json")),
    )?;
    let c = chat_tests::Cluster::start(1, 1).await?;
    for doc in ["openapi.json", "asyncapi.json"] {
        let served = chat_http::client()
            .get(format!("{}/{doc}", c.edge_url(0)))
            .send()
            .await?
            .text()
            .await?;
        let committed = std::fs::read_to_string(root().join("docs").join(doc))?;
        assert!(
            served == committed,
            "{doc}: the edge serves another document than docs/"
        );
    }
    c.stop().await
}
