//! TLS between the roles and to NATS: everything works over it, and
//! nothing that lacks the right CA, name or certificate gets through.

use chat_tests::{Cluster, PROMPTLY, Stack, eventually, pki::Pki, token};

/// A worker that serves TLS and asks for edges' certificates: an edge with
/// the CA and its own certificate sends and delivers through it; a
/// plaintext caller, a caller without a certificate, an edge that trusts
/// another CA, one that expects another name and one that would call in
/// the clear are all refused, and the edge says why.
#[tokio::test]
async fn edges_and_workers_speak_tls_and_refuse_what_they_cannot_verify() -> anyhow::Result<()> {
    let pki = Pki::new("chat")?;
    let (worker_cert, worker_key) = pki.issue("worker", &["127.0.0.1", "localhost"])?.paths();
    let (edge_cert, edge_key) = pki.issue("edge", &["chat-edge"])?.paths();
    let ca = pki.ca_path();
    // the same flags on every node, as an operator would set them: each
    // role takes its own
    let c = Cluster::start_with(
        1,
        1,
        &[
            "--grpc-tls-cert",
            &worker_cert,
            "--grpc-tls-key",
            &worker_key,
            "--grpc-tls-client-ca",
            &ca,
            "--worker-ca",
            &ca,
            "--worker-tls-cert",
            &edge_cert,
            "--worker-tls-key",
            &edge_key,
        ],
    )
    .await?;
    let worker = c.worker_url(0);
    assert!(worker.starts_with("https://"), "{worker}");

    // everything works over it
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "a").await?;
    let mut bob = c.connect(0, "bob", "b").await?;
    let ack = alice.send_text(&g, "tls-1", "over tls").await?;
    let got = bob.message_with(&ack["messageId"]).await?;
    assert_eq!(got["text"], "over tls");

    // a caller with the CA and an edge's certificate is answered (the
    // control for the refusals below)
    let identity = (pki.issue("caller", &["caller"])?, pki.ca.clone());
    let full = chat_rpc::ClientTls::from_files(
        &identity.1,
        Some((&identity.0.cert, &identity.0.key)),
        None,
    )?;
    assert!(
        chat_tests::signed_channel_with(&worker, Some(&full))
            .await
            .is_ok(),
        "a verified caller is answered"
    );
    // in the clear, the worker does not answer at all
    let plain = worker.replacen("https://", "http://", 1);
    assert!(
        chat_tests::signed_channel(&plain).await.is_err(),
        "a plaintext caller is refused"
    );
    // with the CA but no certificate of its own, the handshake fails
    let anonymous = chat_rpc::ClientTls::from_files(&pki.ca, None, None)?;
    assert!(
        chat_tests::signed_channel_with(&worker, Some(&anonymous))
            .await
            .is_err(),
        "a caller without a certificate is refused"
    );

    // edges that cannot verify the worker never call it
    let other = Pki::new("other")?;
    let (other_cert, other_key) = other.issue("edge", &["chat-edge"])?.paths();
    let other_ca = other.ca_path();
    let untrusting = [
        // another CA, whose certificate the worker does not take either
        vec![
            ("--worker-ca", other_ca.as_str()),
            ("--worker-tls-cert", other_cert.as_str()),
            ("--worker-tls-key", other_key.as_str()),
        ],
        // the right CA, but a name the worker's certificate is not for
        vec![("--worker-tls-name", "someone-else.example")],
        // no certificate of its own
        vec![("--worker-tls-cert", ""), ("--worker-tls-key", "")],
    ];
    // the same worker under a URL of their own (a trailing slash), so that
    // the checks counted under it are theirs alone: the registry is the
    // test process's, and the cluster's edge checks the worker too
    let theirs = format!("{worker}/");
    for (i, set) in untrusting.iter().enumerate() {
        let mut set = set.clone();
        set.push(("--workers", &theirs));
        let edge = c.start_extra_node("edge", &set).await?;
        let http = edge
            .http_addr
            .ok_or_else(|| anyhow::anyhow!("no address"))?;
        let ops = edge.ops_addr.ok_or_else(|| anyhow::anyhow!("no address"))?;
        let ops = ops.to_string();
        // its health checks ran and failed, and none passed
        let before = checks(&ops, &theirs, "down").await?;
        eventually(PROMPTLY, || async {
            let now = checks(&ops, &theirs, "down").await?;
            Ok((now >= before + 2.0).then_some(()))
        })
        .await?;
        assert_eq!(
            checks(&ops, &theirs, "up").await?,
            0.0,
            "edge {i} verified it"
        );
        let ready = c.http().get(format!("http://{ops}/readyz")).send().await?;
        assert_eq!(ready.status(), 503, "edge {i} is not ready");
        let status = chat_tests::groups_status(http, "alice").await?;
        assert_eq!(status, 503, "edge {i} calls no worker");
        edge.stop().await?;
    }

    // one process with both roles, its worker on every address: its edge
    // calls it on loopback, over TLS, checked for 127.0.0.1
    let all = c
        .start_extra_node("all", &[("--workers", ""), ("--grpc-listen", "0.0.0.0:0")])
        .await?;
    let http = all.http_addr.ok_or_else(|| anyhow::anyhow!("no address"))?;
    eventually(PROMPTLY, || async {
        let status = chat_tests::groups_status(http, "alice").await?;
        Ok((status == 200).then_some(()))
    })
    .await?;
    all.stop().await?;
    // and without a CA for its own worker it does not start
    let message = c
        .refused_extra_node(
            "all",
            &[
                ("--workers", ""),
                ("--worker-ca", ""),
                ("--worker-tls-cert", ""),
                ("--worker-tls-key", ""),
            ],
        )
        .await?;
    assert!(
        message.contains("with --role all and --grpc-tls-cert"),
        "{message}"
    );

    // an edge with a CA for the workers never calls one in the clear
    let message = c
        .refused_extra_node("edge", &[("--workers", &plain)])
        .await?;
    assert!(message.contains("plaintext"), "{message}");
    // nor one that names https without a CA
    let message = c
        .refused_extra_node(
            "edge",
            &[
                ("--worker-ca", ""),
                ("--worker-tls-cert", ""),
                ("--worker-tls-key", ""),
            ],
        )
        .await?;
    assert!(message.contains("no CA"), "{message}");
    c.stop().await
}

/// `chat_worker_checks_total{outcome}` of `worker` on the edge whose
/// operator routes are at `ops`.
async fn checks(ops: &str, worker: &str, outcome: &str) -> anyhow::Result<f64> {
    let text = chat_http::client()
        .get(format!("http://{ops}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let worker = format!("worker=\"{worker}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("chat_worker_checks_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")) && l.contains(&worker))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A NATS server that requires TLS and verifies clients: a node with the
/// CA and its certificate runs over it (nats-server reports the connection
/// as TLS); a node without the CA, or without a certificate, does not
/// start, and says why.
#[tokio::test]
async fn nodes_reach_nats_over_tls_only_with_the_ca_and_their_certificate() -> anyhow::Result<()> {
    let pki = Pki::new("nats")?;
    let (server_cert, server_key) = pki
        .issue("nats-server", &["127.0.0.1", "localhost"])?
        .paths();
    let (node_cert, node_key) = pki.issue("chatd", &["chatd"])?.paths();
    let ca = pki.ca_path();
    let nats = chat_stack::Nats::start_with_args(&[
        "--tls",
        "--tlscert",
        &server_cert,
        "--tlskey",
        &server_key,
        "--tlscacert",
        &ca,
        "--tlsverify",
    ])
    .await?;
    let (mongo, s3) = tokio::try_join!(chat_stack::Mongo::start(), chat_stack::S3::start())?;
    let c = Cluster::start_on(Stack { nats, mongo, s3 }, 0, 0, &[]).await?;

    let tls = [
        ("--nats-ca", ca.as_str()),
        ("--nats-tls-cert", node_cert.as_str()),
        ("--nats-tls-key", node_key.as_str()),
    ];
    let node = c.start_extra_node("all", &tls).await?;
    let http = node
        .http_addr
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let res = c
        .http()
        .post(format!("http://{http}/groups"))
        .bearer_auth(token("alice"))
        .json(&serde_json::json!({ "name": "over tls", "members": ["bob"] }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "{}", res.text().await?);
    let connz: serde_json::Value = c
        .http()
        .get(format!("{}/connz", c.stack.nats.monitor_url))
        .send()
        .await?
        .json()
        .await?;
    let chatd: Vec<&serde_json::Value> = connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|conn| conn["name"] == "chatd-all")
        .collect();
    assert!(!chatd.is_empty(), "{connz}");
    for conn in chatd {
        assert!(
            conn["tls_version"].as_str().is_some_and(|v| !v.is_empty()),
            "every chatd connection is TLS: {conn}"
        );
    }

    // without the CA (the server's certificate is not trusted), and with
    // it but without a certificate of its own (the server refuses): each
    // gives up after its first connection's deadline, at once
    let ca_only = [("--nats-ca", ca.as_str())];
    let (no_ca, no_cert) = tokio::join!(
        c.refused_extra_node("worker", &[]),
        c.refused_extra_node("worker", &ca_only),
    );
    let (no_ca, no_cert) = (no_ca?, no_cert?);
    assert!(no_ca.contains("no nats server answered"), "{no_ca}");
    assert!(no_cert.contains("over TLS"), "{no_cert}");
    node.stop().await?;
    c.stop().await
}
