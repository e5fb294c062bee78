//! The `chat` command-line client against the real stack: every command a
//! user runs in the README's tour, in text and `--json`, with the server's
//! error codes on failure.

use std::process::Output;

use anyhow::Context;
use chat_tests::{Cluster, PROMPTLY, token};
use serde_json::Value;

/// Runs `chat` against edge 0 as `user` (a token in the environment).
async fn chat(c: &Cluster, user: &str, args: &[&str]) -> anyhow::Result<Output> {
    let config = std::env::temp_dir().join(format!("chat-cli-test-{}", std::process::id()));
    Ok(
        tokio::process::Command::new(chat_stack::workspace_binary("chat", "chat-cli")?)
            .args(args)
            .env("CHAT_SERVER", c.edge_url(0))
            .env("CHAT_TOKEN", token(user))
            .env("CHAT_CONFIG_DIR", config)
            .output()
            .await?,
    )
}

/// `chat --json ...` must succeed: its one JSON document.
async fn chat_json(c: &Cluster, user: &str, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = chat(c, user, &all).await?;
    anyhow::ensure!(
        out.status.success(),
        "chat {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `chat --json tail <group>` as bob's `device`, ending after `count`
/// messages, once it says on stderr that it follows the group.
async fn following(
    c: &Cluster,
    group: &str,
    device: &str,
    count: usize,
) -> anyhow::Result<tokio::process::Child> {
    let mut tail = tokio::process::Command::new(chat_stack::workspace_binary("chat", "chat-cli")?)
        .args(["--json", "tail", group, "--device", device])
        .args(["--count", &count.to_string()])
        .env("CHAT_SERVER", c.edge_url(0))
        .env("CHAT_TOKEN", token("bob"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = tokio::io::BufReader::new(tail.stderr.take().context("stderr")?);
    let mut first = String::new();
    tokio::time::timeout(
        PROMPTLY,
        tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut first),
    )
    .await
    .context("tail never started")??;
    anyhow::ensure!(first.starts_with("following"), "{first}");
    Ok(tail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_the_readme_tour_against_a_real_stack() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;

    // create a group with bob, see it listed and shown
    let g = chat_json(&c, "alice", &["create", "team", "--member", "bob"]).await?;
    let id = g["id"].as_str().context("group id")?.to_owned();
    let listed = chat(&c, "bob", &["groups"]).await?;
    assert!(text(&listed).contains(&id), "{}", text(&listed));
    let shown = chat_json(&c, "bob", &["show", &id]).await?;
    assert_eq!(shown["memberCount"], 2);

    // bob tails the group (as a device of his own) while alice sends; it
    // says on stderr when it follows the group
    let tail = following(&c, &id, "laptop", 2).await?;
    let sent = chat_json(&c, "alice", &["send", &id, "hello", "bob"]).await?;
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain(std::iter::repeat_n(7, 3000))
        .collect();
    let file = tempfile::Builder::new().suffix(".png").tempfile()?;
    std::fs::write(file.path(), &png)?;
    let media = chat_json(
        &c,
        "alice",
        &["send-file", &id, file.path().to_str().context("path")?],
    )
    .await?;
    let out = tokio::time::timeout(PROMPTLY, tail.wait_with_output())
        .await
        .context("tail did not end")??;
    assert!(out.status.success(), "tail failed");
    let lines: Vec<Value> = text(&out)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "hello bob");
    assert_eq!(lines[0]["seq"], sent["seq"]);
    assert_eq!(lines[1]["type"], "image");
    assert_eq!(lines[1]["seq"], media["seq"]);
    assert_eq!(lines[1]["media"]["size"], 3008);

    // two tails of the same device both follow the group (two terminals,
    // like two tabs): each prints the next message
    let tails = [
        following(&c, &id, "desk", 1).await?,
        following(&c, &id, "desk", 1).await?,
    ];
    let both = chat_json(&c, "alice", &["send", &id, "to", "both"]).await?;
    for tail in tails {
        let out = tokio::time::timeout(PROMPTLY, tail.wait_with_output())
            .await
            .context("a tail did not end")??;
        assert!(out.status.success(), "a tail failed");
        let line: Value = serde_json::from_str(text(&out).trim())?;
        assert_eq!(line["seq"], both["seq"]);
    }

    // history pages, in text and JSON
    let history = chat(&c, "bob", &["history", &id]).await?;
    assert!(
        text(&history).contains("alice: hello bob"),
        "{}",
        text(&history)
    );
    let page = chat_json(&c, "bob", &["history", &id, "--limit", "1"]).await?;
    assert_eq!(page["messages"][0]["seq"], both["seq"]);

    // bob reads up to alice's text; the status shows it
    let read = chat_json(
        &c,
        "bob",
        &["read", &id, sent["messageId"].as_str().unwrap_or_default()],
    )
    .await?;
    assert_eq!(read["readSeq"], sent["seq"]);
    let status = chat(
        &c,
        "alice",
        &[
            "status",
            &id,
            sent["messageId"].as_str().unwrap_or_default(),
        ],
    )
    .await?;
    assert!(text(&status).contains("bob read"), "{}", text(&status));

    // alice edits her text and deletes the message to both; history shows it
    let sent_id = sent["messageId"].as_str().unwrap_or_default();
    let edited = chat_json(&c, "alice", &["edit", &id, sent_id, "hello", "again"]).await?;
    assert_eq!(edited["seq"], sent["seq"]);
    let both_id = both["messageId"].as_str().unwrap_or_default();
    let deleted = chat(&c, "alice", &["delete", &id, both_id]).await?;
    assert!(text(&deleted).contains("deleted #"), "{}", text(&deleted));
    let refused = chat(&c, "bob", &["edit", &id, sent_id, "mine now"]).await?;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("forbidden"));
    let shown = chat_tests::eventually(PROMPTLY, || async {
        let page = text(&chat(&c, "bob", &["history", &id]).await?);
        Ok(
            (page.contains("alice: hello again (edited)") && page.contains("alice: [deleted]"))
                .then_some(page),
        )
    })
    .await?;
    assert!(!shown.contains("to both"), "{shown}");

    // the owner renames it; a member may not
    let renamed = chat(&c, "alice", &["rename", &id, "--name", "plans"]).await?;
    assert!(
        text(&renamed).ends_with("is now \"plans\"\n"),
        "{}",
        text(&renamed)
    );
    let refused = chat(&c, "bob", &["rename", &id, "--description", "mine"]).await?;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("forbidden (403)"));

    // bob mutes it for a while, and the list says so; then unmutes it
    let muted = chat(&c, "bob", &["mute", &id, "--until", "2099-01-01T00:00:00Z"]).await;
    let refused = String::from_utf8_lossy(&muted?.stderr).into_owned();
    assert!(
        refused.contains("invalid (400)"),
        "beyond ten years: {refused}"
    );
    let in_a_day = chat_protocol::format_millis(chat_domain::now_millis() + 86_400_000);
    let muted = chat(&c, "bob", &["mute", &id, "--until", &in_a_day]).await?;
    assert_eq!(text(&muted).trim(), format!("muted until {in_a_day}"));
    let listed = text(&chat(&c, "bob", &["groups"]).await?);
    assert!(
        listed.contains(&format!("[muted until {in_a_day}]")),
        "{listed}"
    );
    assert_eq!(
        text(&chat(&c, "bob", &["unmute", &id]).await?).trim(),
        "unmuted"
    );
    assert!(!text(&chat(&c, "bob", &["groups"]).await?).contains("muted"));

    // bob answers alice's text, mentioning her; she reacts and takes it
    // back, sees who is around, and finds the mention
    let answer = chat_json(
        &c,
        "bob",
        &["send", &id, "--reply-to", sent_id, "@alice", "agreed"],
    )
    .await?;
    let answer_id = answer["messageId"].as_str().unwrap_or_default();
    let last = text(&chat(&c, "alice", &["history", &id, "--limit", "1"]).await?);
    assert!(
        last.contains(&format!("bob: (re #{}) @alice agreed", sent["seq"])),
        "{last}"
    );
    let reacted = chat(&c, "alice", &["react", &id, answer_id, "👍"]).await?;
    assert_eq!(text(&reacted).trim(), "👍 1 (yours among them)");
    let taken = chat(&c, "alice", &["react", &id, answer_id, "👍", "--remove"]).await?;
    assert_eq!(text(&taken).trim(), "👍 0 (not yours)");
    // pins: one, listed with who pinned it; then none
    let pinned = chat(&c, "alice", &["pin", &id, answer_id]).await?;
    assert_eq!(text(&pinned).trim(), format!("pinned {answer_id}"));
    let listed = text(&chat(&c, "bob", &["pins", &id]).await?);
    assert!(
        listed.starts_with(&format!(
            "#{} {answer_id} (pinned by alice at ",
            answer["seq"]
        )),
        "{listed}"
    );
    chat(&c, "alice", &["unpin", &id, answer_id]).await?;
    assert_eq!(
        text(&chat(&c, "bob", &["pins", &id]).await?).trim(),
        "no pinned messages"
    );
    // search: the words in any order and case, across what the query
    // string must encode (a space, `&`)
    let found = text(&chat(&c, "bob", &["search", &id, "AGREED", "&", "@alice"]).await?);
    assert_eq!(found.lines().count(), 1, "{found}");
    let found = text(&chat(&c, "bob", &["search", &id, "AGREED", "@alice"]).await?);
    let lines: Vec<&str> = found.lines().collect();
    assert_eq!(lines.len(), 2, "{found}");
    assert!(lines[0].contains("bob: (re #"), "{found}");
    assert_eq!(lines[1], "searched back to the first message you see");
    let around = text(&chat(&c, "alice", &["presence", &id]).await?);
    for user in ["alice", "bob"] {
        assert!(
            around.lines().any(|l| l.starts_with(&format!("{user} "))),
            "{around}"
        );
    }
    let mentioned = chat_tests::eventually(PROMPTLY, || async {
        let page = text(&chat(&c, "alice", &["mentions"]).await?);
        Ok(page
            .contains(&format!("#{} by bob in {id}", answer["seq"]))
            .then_some(page))
    })
    .await?;
    assert!(!mentioned.contains("no mentions"), "{mentioned}");

    // members: add, remove; errors carry the server's code
    chat_json(&c, "alice", &["add", &id, "carol"]).await?;
    let refused = chat(&c, "carol", &["remove", &id, "bob"]).await?;
    assert_eq!(refused.status.code(), Some(1));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("forbidden (403)"), "{why}");
    let json_error = chat(&c, "carol", &["--json", "remove", &id, "bob"]).await?;
    let e: Value = serde_json::from_slice(&json_error.stdout)?;
    assert_eq!(e["error"]["code"], "forbidden");
    chat_json(&c, "carol", &["leave", &id]).await?;
    let outsider = chat(&c, "carol", &["history", &id]).await?;
    assert!(String::from_utf8_lossy(&outsider.stderr).contains("forbidden"));

    // carol blocks alice, who can then not add her back; then unblocks
    let blocked = chat_json(&c, "carol", &["block", "alice"]).await?;
    assert_eq!(blocked["userId"], "alice");
    assert!(text(&chat(&c, "carol", &["blocks"]).await?).starts_with("alice (since "));
    let refused = chat(&c, "alice", &["add", &id, "carol"]).await?;
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("forbidden (403)"), "{why}");
    assert_eq!(
        text(&chat(&c, "carol", &["unblock", "alice"]).await?).trim(),
        "unblocked alice"
    );
    assert_eq!(
        chat_json(&c, "carol", &["blocks"]).await?["blocks"],
        serde_json::json!([])
    );
    chat_json(&c, "alice", &["add", &id, "carol"]).await?;

    // alice hands the group to bob: then only he may remove carol
    let handed = chat(&c, "alice", &["owner", &id, "bob"]).await?;
    assert_eq!(text(&handed).trim(), format!("bob owns {id} now"));
    let refused = chat(&c, "alice", &["remove", &id, "carol"]).await?;
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("forbidden (403)"), "{why}");

    // bob invites erin with a single-use code; she joins with it
    let made = text(&chat(&c, "bob", &["invite", &id, "--max-uses", "1"]).await?);
    let code = made.lines().next().unwrap_or_default().to_owned();
    assert!(
        made.contains("anyone with the code joins with: chat join"),
        "{made}"
    );
    let listed = text(&chat(&c, "bob", &["invites", &id]).await?);
    assert!(listed.contains("0 of 1 used"), "{listed}");
    let joined = text(&chat(&c, "erin", &["join", &code]).await?);
    assert!(joined.starts_with(&format!("joined {id}  ")), "{joined}");
    let spent = chat(&c, "frank", &["join", &code]).await?;
    assert!(String::from_utf8_lossy(&spent.stderr).contains("not_found (404)"));
    assert_eq!(
        text(&chat(&c, "bob", &["invites", &id]).await?).trim(),
        "no valid invites"
    );
    let another = chat_json(&c, "bob", &["invite", &id]).await?;
    let invite_id = another["inviteId"].as_str().unwrap_or_default();
    assert_eq!(
        text(&chat(&c, "bob", &["revoke-invite", &id, invite_id]).await?).trim(),
        format!("revoked {invite_id}")
    );

    // only its owner deletes the group, for everyone
    let refused = chat(&c, "alice", &["delete-group", &id]).await?;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("forbidden (403)"));
    let deleted = chat(&c, "bob", &["delete-group", &id]).await?;
    assert_eq!(text(&deleted).trim(), format!("deleted {id} for everyone"));
    let gone = chat(&c, "alice", &["history", &id]).await?;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found (404)"));

    // a bad token is refused before anything happens
    let bad = tokio::process::Command::new(chat_stack::workspace_binary("chat", "chat-cli")?)
        .args(["groups"])
        .env("CHAT_SERVER", c.edge_url(0))
        .env("CHAT_TOKEN", "not-a-token")
        .output()
        .await?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unauthorized (401)"));

    // login keeps a token for later commands; a dev stack's tokens can be
    // minted by the CLI itself
    let dir = tempfile::tempdir()?;
    let minted = tokio::process::Command::new(chat_stack::workspace_binary("chat", "chat-cli")?)
        .args(["token", "--user", "dave", "--secret", chat_tests::SECRET])
        .output()
        .await?;
    let dave = String::from_utf8(minted.stdout)?.trim().to_owned();
    let bin = chat_stack::workspace_binary("chat", "chat-cli")?;
    let login = tokio::process::Command::new(&bin)
        .args(["login", &dave])
        .env("CHAT_SERVER", c.edge_url(0))
        .env("CHAT_CONFIG_DIR", dir.path())
        .env_remove("CHAT_TOKEN")
        .output()
        .await?;
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let groups = tokio::process::Command::new(&bin)
        .args(["groups"])
        .env("CHAT_SERVER", c.edge_url(0))
        .env("CHAT_CONFIG_DIR", dir.path())
        .env_remove("CHAT_TOKEN")
        .output()
        .await?;
    assert_eq!(text(&groups).trim(), "no groups");
    c.stop().await
}

/// A file whose message cannot be sent is given back: its object goes at
/// once and no message may use the upload. (Here the send fails because
/// the CLI's device is one more new device than the user may register
/// this hour, after the upload was put.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_file_gives_back_an_upload_whose_message_fails() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, 1, &["--max-new-devices-per-hour", "1"]).await?;
    // (alice's one new device this hour subscribes her)
    let g = c.room(&["alice"]).await?;
    let file = tempfile::Builder::new().suffix(".ogg").tempfile()?;
    std::fs::write(file.path(), [5u8; 64])?;
    let out = chat(
        &c,
        "alice",
        &["send-file", &g, file.path().to_str().context("path")?],
    )
    .await?;
    assert!(!out.status.success(), "{}", text(&out));
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("429"), "{why}");
    let uploads = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("uploads");
    let upload = uploads
        .find_one(mongodb::bson::doc! { "groupId": &g })
        .await?
        .context("the upload was issued")?;
    assert_eq!(upload.get_bool("released"), Ok(true), "{upload}");
    let key = upload.get_str("_id")?;
    let object = std::path::Path::new(&c.stack.s3.root)
        .join(&c.stack.s3.bucket)
        .join(key);
    assert!(!object.exists(), "the object of a given-back upload stays");
    c.stop().await
}
