//! The web client (`/app/`) in a real, headless Chromium driven over
//! WebDriver, against the real stack: two users in two browsers create a
//! group, talk, see each other live and in order, send and view an image,
//! go away and catch up, and see read receipts change; a second tab of the
//! same user receives too.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/install-deps`
//! installs them); without them the test fails and says so. Screenshots of
//! the main screens go to `target/tmp/web-client/`.

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use chat_tests::{Cluster, eventually};
use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A 2×2 PNG (red, green / blue, white).
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd, 0xd4, 0x9a,
    0x73, 0x00, 0x00, 0x00, 0x16, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xc0,
    0xf0, 0x1f, 0x08, 0x19, 0x18, 0xfe, 0xff, 0xff, 0x0f, 0x00, 0x2a, 0xf3, 0x05, 0xfc, 0x53, 0xa1,
    0x4e, 0xa9, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// `chromedriver` on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
    _profiles: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver's browsers are in its process group: a test that
        // failed before closing them must not leave them running (a day's
        // failed runs once left 250 processes behind)
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(var: &str, default: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
    if !path.exists() {
        bail!(
            "{} not found: the browser tests need Debian's chromium and chromium-driver \
             (run scripts/install-deps, or `apt-get install chromium chromium-driver`; \
             or point {var} at it)",
            path.display()
        );
    }
    Ok(path)
}

impl Driver {
    /// chromedriver on a port picked first: another test's socket may take
    /// it before chromedriver binds it, and chromedriver exits; then again
    /// on another.
    async fn start() -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once().await {
                Err(e) if attempt < 3 => {
                    eprintln!("chromedriver did not come up ({e:#}); again on another port");
                }
                other => return other,
            }
        }
    }

    async fn start_once() -> anyhow::Result<Self> {
        let driver = installed("CHAT_CHROMEDRIVER", "/usr/bin/chromedriver")?;
        installed("CHAT_CHROMIUM", "/usr/bin/chromium")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(driver)
            // a process group of its own, which its browsers join
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        let http = chat_http::client();
        let mut d = Self {
            child,
            url,
            _profiles: tempfile::Builder::new().prefix("chat-browser-").tempdir()?,
        };
        eventually(WAIT, || {
            let exited = d.child.try_wait().ok().flatten();
            let r = http.get(&status).send();
            async move {
                if let Some(code) = exited {
                    bail!("chromedriver exited with {code}");
                }
                Ok(r.await.ok().filter(|r| r.status().is_success()).map(drop))
            }
        })
        .await
        .context("chromedriver did not come up")?;
        Ok(d)
    }

    /// A new browser with its own profile.
    async fn browser(&self, name: &str) -> anyhow::Result<Client> {
        let profile = self._profiles.path().join(name);
        let chromium = installed("CHAT_CHROMIUM", "/usr/bin/chromium")?;
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1100,800",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            bail!("capabilities")
        };
        Ok(
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&self.url)
                .await?,
        )
    }
}

/// Evaluates `expr` (a JavaScript expression) in the page.
async fn js(c: &Client, expr: &str) -> anyhow::Result<Value> {
    Ok(c.execute(&format!("return ({expr});"), vec![]).await?)
}

/// Waits until `expr` is truthy in the page; fails with `what`.
async fn until(c: &Client, what: &str, expr: &str) -> anyhow::Result<()> {
    let r = eventually(WAIT, || async {
        let v = js(c, expr).await?;
        Ok((v.as_bool() == Some(true)).then_some(()))
    })
    .await;
    if r.is_err() {
        // what the page shows, for the failure's message
        let page = js(
            c,
            "JSON.stringify({state: document.querySelector('#conn-state')?.dataset.state, \
             error: document.querySelector('#error')?.textContent, \
             messages: [...document.querySelectorAll('#messages .message')].map(e => e.textContent)})",
        )
        .await
        .unwrap_or_default();
        return r.with_context(|| format!("waiting for: {what}; the page: {page}"));
    }
    Ok(())
}

async fn el(c: &Client, css: &str) -> anyhow::Result<Element> {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .with_context(|| format!("no {css}"))
}

async fn shot(c: &Client, name: &str) -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-client");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.png")), c.screenshot().await?)?;
    Ok(())
}

/// Opens the client and signs in as `user` with a development token.
async fn sign_in(c: &Client, base: &str, user: &str) -> anyhow::Result<()> {
    c.goto(&format!("{base}/app/")).await?;
    el(c, "#dev-user").await?.send_keys(user).await?;
    el(c, "#dev-signin").await?.click().await?;
    until(
        c,
        "live",
        "document.querySelector('#conn-state')?.dataset.state === 'live'",
    )
    .await
}

/// Waits until the open group's messages show `want`, in page order;
/// fails with `what` and what the page shows.
async fn shows(c: &Client, want: &[String], what: &str) -> anyhow::Result<()> {
    let r = eventually(WAIT, || async {
        Ok((texts(c).await? == want).then_some(()))
    })
    .await;
    if r.is_err() {
        let shown = texts(c).await.unwrap_or_default();
        return r.with_context(|| format!("{what}: want {want:?}, the page shows {shown:?}"));
    }
    Ok(())
}

/// The texts of the open group's messages, in page order.
async fn texts(c: &Client) -> anyhow::Result<Vec<String>> {
    let v = js(
        c,
        "[...document.querySelectorAll('#messages .message .text')].map(e => e.textContent)",
    )
    .await?;
    Ok(serde_json::from_value(v)?)
}

async fn open_group(c: &Client, name: &str) -> anyhow::Result<()> {
    let pick = format!(
        "[...document.querySelectorAll('#groups li[data-group-id] button')]\
         .find(b => b.textContent.includes({name:?}))"
    );
    until(c, &format!("group {name} listed"), &format!("!!{pick}")).await?;
    js(c, &format!("{pick}.click()")).await?;
    until(
        c,
        "chat view",
        "!!document.querySelector('#composer') && document.querySelector('#composer').offsetParent !== null",
    )
    .await
}

async fn send(c: &Client, text: &str) -> anyhow::Result<()> {
    let input = el(c, "#message-input").await?;
    input.send_keys(text).await?;
    // Enter sends
    input.send_keys("\u{E007}").await?;
    Ok(())
}

#[tokio::test]
async fn two_users_chat_in_real_browsers() -> anyhow::Result<()> {
    let driver = Driver::start().await?;
    let mut c = Cluster::start_with(1, 1, &["--dev-tokens"]).await?;
    let base = c.edge_url(0);
    let alice = driver.browser("alice").await?;
    let bob = driver.browser("bob").await?;

    // the sign-in screen
    alice.goto(&format!("{base}/app/")).await?;
    el(&alice, "#signin-form").await?;
    shot(&alice, "1-sign-in").await?;
    sign_in(&alice, &base, "alice").await?;
    sign_in(&bob, &base, "bob").await?;

    // a server error is shown with its code
    el(&alice, "#group-name").await?.send_keys("Bad").await?;
    el(&alice, "#group-members")
        .await?
        .send_keys("not a user!")
        .await?;
    js(
        &alice,
        "document.querySelector('#create-group').requestSubmit()",
    )
    .await?;
    until(
        &alice,
        "the server's invalid error shown",
        "document.querySelector('#error')?.dataset.code === 'invalid'",
    )
    .await?;

    // the error can be dismissed
    el(&alice, "#error-close").await?.click().await?;
    until(
        &alice,
        "the error dismissed",
        "document.querySelector('#error').hidden",
    )
    .await?;

    // alice creates a group with bob; bob hears of it live
    js(
        &alice,
        "(() => { for (const id of ['#group-name', '#group-members']) document.querySelector(id).value = ''; })()",
    )
    .await?;
    el(&alice, "#group-name")
        .await?
        .send_keys("Weekend trip")
        .await?;
    el(&alice, "#group-members").await?.send_keys("bob").await?;
    js(
        &alice,
        "document.querySelector('#create-group').requestSubmit()",
    )
    .await?;
    open_group(&alice, "Weekend trip").await?;
    open_group(&bob, "Weekend trip").await?;

    // both are online, and both see it
    for page in [&alice, &bob] {
        until(
            page,
            "both members shown online",
            "document.querySelector('#chat-members').textContent === '2 members, 2 online'",
        )
        .await?;
    }

    // alice types: bob sees it; sending stops it
    el(&alice, "#message-input").await?.send_keys("hel").await?;
    until(
        &bob,
        "alice shown typing to bob",
        "document.querySelector('#typing').textContent === 'alice is typing…'",
    )
    .await?;
    js(
        &alice,
        "(() => { document.querySelector('#message-input').value = ''; })()",
    )
    .await?;

    // messages both ways, live and in order
    let from_alice: Vec<String> = (1..=5).map(|i| format!("alice says {i}")).collect();
    for t in &from_alice {
        send(&alice, t).await?;
    }
    shows(&bob, &from_alice, "bob sees alice's five messages in order").await?;
    until(
        &bob,
        "alice no longer shown typing once she sent",
        "document.querySelector('#typing').textContent === ''",
    )
    .await?;
    send(&bob, "bob answers").await?;
    let mut all = from_alice.clone();
    all.push("bob answers".into());
    shows(&alice, &all, "alice sees the whole conversation in order").await?;

    // alice edits one of her messages and deletes another: bob sees both
    // at their places, live
    let mine = |text: &str| {
        format!(
            "[...document.querySelectorAll('#messages .message.mine')]\
             .find(e => e.querySelector('.text')?.textContent === {text:?})"
        )
    };
    js(
        &alice,
        &format!(
            "{}.querySelector('button.edit').click()",
            mine("alice says 5")
        ),
    )
    .await?;
    until(
        &alice,
        "the composer edits the message",
        "!document.querySelector('#editing').hidden && \
         document.querySelector('#message-input').value === 'alice says 5'",
    )
    .await?;
    js(
        &alice,
        "(() => { document.querySelector('#message-input').value = ''; })()",
    )
    .await?;
    send(&alice, "alice says five").await?;
    let delete = format!(
        "{}.querySelector('button.delete').click()",
        mine("alice says 4")
    );
    js(&alice, &delete).await?;
    js(&alice, &delete).await?;
    all[4] = "alice says five".into();
    all[3] = "This message was deleted".into();
    shows(&bob, &all, "bob sees the edit and the tombstone in place").await?;
    until(
        &bob,
        "the edited message is marked",
        "[...document.querySelectorAll('#messages .message')]\
         .some(e => e.querySelector('.text')?.textContent === 'alice says five' && !!e.querySelector('.edited'))",
    )
    .await?;
    shows(&alice, &all, "alice's own page shows them too").await?;
    shot(&bob, "2b-edited-and-deleted").await?;

    // bob has the group open and visible: alice's messages are read
    until(
        &alice,
        "alice's last message read by bob",
        "(() => { const r = [...document.querySelectorAll('#messages .message.mine .receipt')].pop(); \
          return !!r && r.dataset.read === '1' && r.dataset.total === '1'; })()",
    )
    .await?;
    shot(&alice, "2-chat-with-receipts").await?;

    // an image through the pre-signed upload, shown to bob from the store
    let dir = tempfile::tempdir()?;
    let png = dir.path().join("dot.png");
    std::fs::write(&png, PNG)?;
    el(&alice, "#file-input")
        .await?
        .send_keys(&png.display().to_string())
        .await?;
    until(
        &bob,
        "bob sees alice's image, loaded",
        "[...document.querySelectorAll('#messages .message img')].some(i => i.complete && i.naturalWidth === 2)",
    )
    .await?;
    shot(&bob, "3-image").await?;

    // bob goes away (once his client has marked the image read); alice
    // writes on; bob comes back and catches up
    eventually(WAIT, || async {
        let (_, page) = c.get(0, "bob", "/groups").await?;
        Ok((page["groups"][0]["unreadCount"] == json!(0)).then_some(()))
    })
    .await
    .context("bob's client marks what it shows read")?;
    let bob_device = js(&bob, "sessionStorage.getItem('chat.device')").await?;
    bob.goto("about:blank").await?;
    let away: Vec<String> = (1..=3)
        .map(|i| format!("while you were away {i}"))
        .collect();
    for t in &away {
        send(&alice, t).await?;
    }
    bob.goto(&format!("{base}/app/")).await?;
    until(
        &bob,
        "bob back",
        "document.querySelector('#conn-state')?.dataset.state === 'live'",
    )
    .await?;
    assert_eq!(
        js(&bob, "sessionStorage.getItem('chat.device')").await?,
        bob_device,
        "the tab keeps its device"
    );
    let unread = js(
        &bob,
        "[...document.querySelectorAll('#groups li[data-group-id] .unread')].map(e => e.dataset.count)",
    )
    .await?;
    assert_eq!(unread, json!(["3"]), "bob's unread count while away");
    open_group(&bob, "Weekend trip").await?;
    let tail = away.clone();
    eventually(WAIT, || async {
        let t = texts(&bob).await?;
        Ok(t.ends_with(&tail).then_some(()))
    })
    .await
    .context("bob caught up, in order")?;
    let t = texts(&bob).await?;
    let mut sorted = t.clone();
    sorted.dedup();
    assert_eq!(t, sorted, "nothing twice");

    // a second tab of alice: its own device, and it receives too
    let first = alice.window().await?;
    let tab = alice.new_window(true).await?;
    alice.switch_to_window(tab.handle.clone()).await?;
    alice.goto(&format!("{base}/app/")).await?;
    until(
        &alice,
        "second tab live",
        "document.querySelector('#conn-state')?.dataset.state === 'live'",
    )
    .await?;
    let second_device = js(&alice, "sessionStorage.getItem('chat.device')").await?;
    open_group(&alice, "Weekend trip").await?;
    send(&bob, "to both tabs").await?;
    until(
        &alice,
        "the second tab receives",
        "[...document.querySelectorAll('#messages .message .text')].some(e => e.textContent === 'to both tabs')",
    )
    .await?;
    alice.switch_to_window(first).await?;
    until(
        &alice,
        "the first tab receives",
        "[...document.querySelectorAll('#messages .message .text')].some(e => e.textContent === 'to both tabs')",
    )
    .await?;
    let first_device = js(&alice, "sessionStorage.getItem('chat.device')").await?;
    assert_ne!(first_device, second_device, "each tab has its own device");

    // the connection drops (the edge restarts): bob's page shows it,
    // reconnects by itself, catches up and is live again
    js(
        &bob,
        "(() => { const el = document.querySelector('#conn-state'); window.__states = []; \
          new MutationObserver(() => window.__states.push(el.dataset.state)) \
          .observe(el, {attributes: true, attributeFilter: ['data-state']}); return true; })()",
    )
    .await?;
    c.restart_edge(0).await?;
    until(
        &bob,
        "offline, then catching up, then live again",
        "(() => { const s = window.__states || []; const o = s.indexOf('offline'); \
          const k = s.indexOf('catching-up', o); return o >= 0 && k > o && s.indexOf('live', k) > k; })()",
    )
    .await?;
    until(
        &alice,
        "alice live again",
        "document.querySelector('#conn-state')?.dataset.state === 'live'",
    )
    .await?;
    send(&alice, "after the restart").await?;
    until(
        &bob,
        "bob receives after reconnecting",
        "[...document.querySelectorAll('#messages .message .text')].some(e => e.textContent === 'after the restart')",
    )
    .await?;

    // at phone width the chat takes the screen, with a way back
    bob.set_window_size(390, 844).await?;
    until(
        &bob,
        "back button at phone width",
        "document.querySelector('#back')?.offsetParent !== null",
    )
    .await?;
    shot(&bob, "4-phone").await?;

    alice.close().await?;
    bob.close().await?;
    c.stop().await?;
    Ok(())
}

/// alice and bob in their own browsers, signed in to a stack of their own,
/// with a group alice created from her page open on both.
struct Pair {
    _driver: Driver,
    c: Cluster,
    base: String,
    alice: Client,
    bob: Client,
}

async fn two_in_a_group(group: &str) -> anyhow::Result<Pair> {
    let driver = Driver::start().await?;
    let c = Cluster::start_with(1, 1, &["--dev-tokens"]).await?;
    let base = c.edge_url(0);
    let alice = driver.browser("alice").await?;
    let bob = driver.browser("bob").await?;
    sign_in(&alice, &base, "alice").await?;
    sign_in(&bob, &base, "bob").await?;
    el(&alice, "#group-name").await?.send_keys(group).await?;
    el(&alice, "#group-members").await?.send_keys("bob").await?;
    js(
        &alice,
        "document.querySelector('#create-group').requestSubmit()",
    )
    .await?;
    open_group(&alice, group).await?;
    open_group(&bob, group).await?;
    Ok(Pair {
        _driver: driver,
        c,
        base,
        alice,
        bob,
    })
}

/// The owner renames a group, adds members and removes one from its
/// settings, a member mutes it (the server keeps that) and leaves it, and
/// the owner hands the group on: each page follows what the other did.
#[tokio::test]
async fn an_owner_manages_a_group_and_a_member_mutes_and_leaves_it_in_real_browsers()
-> anyhow::Result<()> {
    let Pair {
        _driver,
        c,
        base,
        alice,
        bob,
    } = two_in_a_group("Book club").await?;
    let submit = |form: &str| format!("document.querySelector('#{form}').requestSubmit()");

    // the owner's tools for the owner, leaving for the others
    let shown = |id: &str| format!("!document.querySelector('#{id}').hidden");
    until(&alice, "owner tools", &shown("rename-form")).await?;
    assert_eq!(js(&alice, &shown("leave-group")).await?, json!(false));
    until(&bob, "leaving for a member", &shown("leave-group")).await?;
    assert_eq!(js(&bob, &shown("rename-form")).await?, json!(false));
    assert_eq!(js(&bob, &shown("add-member-form")).await?, json!(false));

    // alice renames it: both pages show the new name
    js(&alice, "document.querySelector('#group-tools').open = true").await?;
    el(&alice, "#rename-name")
        .await?
        .send_keys("Reading club")
        .await?;
    js(&alice, &submit("rename-form")).await?;
    for page in [&alice, &bob] {
        until(
            page,
            "the new name",
            "document.querySelector('#chat-title').textContent === 'Reading club'",
        )
        .await?;
    }
    // adds carol and dave, then removes dave from the member list
    el(&alice, "#add-member")
        .await?
        .send_keys("carol dave")
        .await?;
    js(&alice, &submit("add-member-form")).await?;
    let members_are = |n: u32| {
        format!("document.querySelector('#chat-members').textContent.startsWith('{n} members')")
    };
    for page in [&alice, &bob] {
        until(page, "four members", &members_are(4)).await?;
    }
    let member =
        |id: &str| format!("document.querySelector('#member-list li[data-user-id=\"{id}\"]')");
    assert_eq!(
        js(
            &bob,
            &format!("!!{}?.querySelector('button')", member("dave"))
        )
        .await?,
        json!(false),
        "a member lists the members, with no owner's buttons"
    );
    // (a second click confirms)
    let remove = format!("{}.querySelector('button.remove')", member("dave"));
    js(&alice, &format!("{remove}.click()")).await?;
    assert_eq!(
        js(&alice, &format!("{remove}.textContent")).await?,
        json!("Remove?")
    );
    js(&alice, &format!("{remove}.click()")).await?;
    for page in [&alice, &bob] {
        until(page, "three members", &members_are(3)).await?;
    }

    // bob mutes it: the server keeps it, and a reload shows it
    js(&bob, "document.querySelector('#mute-toggle').click()").await?;
    until(
        &bob,
        "shown muted",
        "document.querySelector('#mute-toggle').getAttribute('aria-pressed') === 'true'",
    )
    .await?;
    let (_, page) = c.get(0, "bob", "/groups").await?;
    assert_eq!(page["groups"][0]["muted"], true, "{page}");
    bob.goto(&format!("{base}/app/")).await?;
    open_group(&bob, "Reading club").await?;
    until(
        &bob,
        "still muted after a reload",
        "document.querySelector('#mute-toggle').textContent === 'Unmute notifications'",
    )
    .await?;

    // bob leaves: the group goes from his page, and alice sees two members
    js(&bob, "document.querySelector('#leave-group').click()").await?;
    until(
        &bob,
        "the group gone",
        "document.querySelectorAll('#groups li[data-group-id]').length === 0 \
         && document.querySelector('#chat-body').hidden",
    )
    .await?;
    until(
        &alice,
        "two members left",
        "document.querySelector('#chat-members').textContent === '2 members, 1 online'",
    )
    .await?;
    shot(&alice, "6-group-settings").await?;

    // alice hands the group to carol: her owner's tools go, leaving comes
    let hand = format!("{}.querySelector('button.make-owner')", member("carol"));
    js(&alice, &format!("{hand}.click()")).await?;
    js(&alice, &format!("{hand}.click()")).await?;
    until(&alice, "no longer the owner", &shown("leave-group")).await?;
    assert_eq!(js(&alice, &shown("rename-form")).await?, json!(false));
    let (_, group) = c.get(0, "alice", "/groups").await?;
    assert_eq!(group["groups"][0]["ownerId"], "carol", "{group}");
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// A member pins a message from its actions: both pages show it pinned,
/// with who pinned it; the owner unpins it, and both pages follow.
#[tokio::test]
async fn members_pin_and_unpin_messages_in_real_browsers() -> anyhow::Result<()> {
    let Pair {
        _driver,
        c,
        alice,
        bob,
        ..
    } = two_in_a_group("Pins").await?;
    send(&alice, "remember this").await?;
    shows(&bob, &["remember this".to_owned()], "bob sees the message").await?;
    let pin_button = "document.querySelector('#messages .message[data-seq=\"1\"] button.pin')";
    js(&bob, &format!("{pin_button}.click()")).await?;
    for page in [&alice, &bob] {
        until(
            page,
            "shown pinned",
            "!document.querySelector('#pinned').hidden && \
             document.querySelector('#pin-list li')?.textContent === 'remember this (pinned by bob)'",
        )
        .await?;
    }
    until(
        &alice,
        "the message offers to unpin",
        &format!("{pin_button}.textContent === 'Unpin'"),
    )
    .await?;
    let (_, pins) = c
        .get(
            0,
            "alice",
            &format!("/groups/{}/pins", group_id(&c, "alice").await?),
        )
        .await?;
    assert_eq!(pins["pins"][0]["pinnedBy"], "bob", "{pins}");
    shot(&alice, "7-pinned").await?;
    js(&alice, &format!("{pin_button}.click()")).await?;
    for page in [&alice, &bob] {
        until(
            page,
            "no pins shown",
            "document.querySelector('#pinned').hidden",
        )
        .await?;
    }
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// A member searches the group: the match from before the page's history
/// is listed, and choosing it reads older pages until the conversation
/// shows it.
#[tokio::test]
async fn a_member_searches_a_group_and_is_shown_the_match_in_a_real_browser() -> anyhow::Result<()>
{
    let Pair {
        _driver,
        c,
        alice,
        bob,
        ..
    } = two_in_a_group("Search").await?;
    let g = group_id(&c, "alice").await?;
    let mut tool = c.connect(0, "alice", "tool").await?;
    tool.send_text(&g, "needle", "the Needle is here").await?;
    for i in 0..60 {
        tool.send_text(&g, &format!("hay-{i}"), &format!("hay {i}"))
            .await?;
    }
    // a fresh page holds only the newest 50
    js(&bob, "location.reload()").await?;
    open_group(&bob, "Search").await?;
    until(
        &bob,
        "the newest page",
        "document.querySelectorAll('#messages li.message').length === 50",
    )
    .await?;
    el(&bob, "#search-input")
        .await?
        .send_keys("needle THE")
        .await?;
    js(
        &bob,
        "document.querySelector('#search-form').requestSubmit()",
    )
    .await?;
    until(
        &bob,
        "the match listed",
        "document.querySelector('#search-list li')?.textContent === '#1 alice: the Needle is here' && \
         document.querySelector('#search-status').textContent.includes('1 match') && \
         document.querySelector('#search-more').hidden",
    )
    .await?;
    shot(&bob, "8-search").await?;
    js(&bob, "document.querySelector('#search-list li').click()").await?;
    until(
        &bob,
        "the match shown in the conversation",
        "document.querySelector('#messages li.message.found')?.dataset.seq === '1'",
    )
    .await?;
    js(&bob, "document.querySelector('#search-close').click()").await?;
    until(
        &bob,
        "the search closed",
        "document.querySelector('#search-results').hidden",
    )
    .await?;
    tool.close().await?;
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// The owner makes an invite link in the group's settings; someone not in
/// the group opens it, is asked, joins, and the group opens for them while
/// the owner's page counts one member more.
#[tokio::test]
async fn an_invite_link_lets_a_newcomer_join_in_real_browsers() -> anyhow::Result<()> {
    let Pair {
        _driver,
        c,
        base,
        alice,
        bob,
    } = two_in_a_group("Invites").await?;
    js(&alice, "document.querySelector('#group-tools').open = true").await?;
    js(&alice, "document.querySelector('#create-invite').click()").await?;
    until(
        &alice,
        "the link shown, the invite listed",
        "document.querySelector('#invite-link').value.includes('#invite=') && \
         document.querySelectorAll('#invite-list li').length === 1",
    )
    .await?;
    let link = js(&alice, "document.querySelector('#invite-link').value").await?;
    let link = link.as_str().context("a link")?.to_owned();
    shot(&alice, "9-invite").await?;

    let carol = _driver.browser("carol").await?;
    sign_in(&carol, &base, "carol").await?;
    assert_eq!(
        js(
            &carol,
            "document.querySelectorAll('#groups li[data-group-id]').length"
        )
        .await?,
        json!(0)
    );
    carol.goto(&link).await?;
    until(
        &carol,
        "asked to join",
        "!document.querySelector('#join-offer').hidden",
    )
    .await?;
    // the code left the address bar
    until(
        &carol,
        "no code in the address",
        "!location.hash.includes('invite')",
    )
    .await?;
    js(&carol, "document.querySelector('#join-accept').click()").await?;
    until(
        &carol,
        "the group open",
        "document.querySelector('#chat-title')?.textContent === 'Invites' && \
         document.querySelector('#join-offer').hidden",
    )
    .await?;
    until(
        &alice,
        "three members",
        "document.querySelector('#chat-members').textContent.startsWith('3 members')",
    )
    .await?;
    // and carol is in it for the server too
    let (_, page) = c.get(0, "carol", "/groups").await?;
    assert_eq!(page["groups"][0]["name"], "Invites", "{page}");
    carol.close().await?;
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// The id of `user`'s one group.
async fn group_id(c: &Cluster, user: &str) -> anyhow::Result<String> {
    let (_, page) = c.get(0, user, "/groups").await?;
    Ok(page["groups"][0]["id"]
        .as_str()
        .context("a group")?
        .to_owned())
}

/// The owner deletes a group from its settings (a second click confirms):
/// it goes from both pages, and the server has it no more.
#[tokio::test]
async fn an_owner_deletes_a_group_in_real_browsers() -> anyhow::Result<()> {
    let Pair {
        _driver,
        c,
        alice,
        bob,
        ..
    } = two_in_a_group("Doomed").await?;
    send(&alice, "last words").await?;
    shows(&bob, &["last words".to_owned()], "bob sees the message").await?;
    let delete = "document.querySelector('#delete-group')";
    assert_eq!(
        js(&bob, &format!("{delete}.hidden")).await?,
        json!(true),
        "only the owner may"
    );
    js(&alice, "document.querySelector('#group-tools').open = true").await?;
    js(&alice, &format!("{delete}.click()")).await?;
    assert_eq!(
        js(&alice, &format!("{delete}.textContent")).await?,
        json!("Delete the group for everyone?")
    );
    assert_eq!(
        c.get(0, "alice", "/groups").await?.1["groups"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "one click asks only"
    );
    js(&alice, &format!("{delete}.click()")).await?;
    for page in [&alice, &bob] {
        until(
            page,
            "the group gone",
            "document.querySelectorAll('#groups li[data-group-id]').length === 0 \
             && document.querySelector('#chat-body').hidden",
        )
        .await?;
    }
    for user in ["alice", "bob"] {
        let (_, page) = c.get(0, user, "/groups").await?;
        assert_eq!(page["groups"], json!([]), "{user}: {page}");
    }
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// Replies, reactions and mentions in the web client: bob answers alice's
/// message (both pages show what it answers), alice reacts to the answer
/// and takes it back (bob's page follows each), then mentions bob, whose
/// list marks the group until he opens it.
#[tokio::test]
async fn members_reply_and_react_in_real_browsers() -> anyhow::Result<()> {
    let Pair {
        _driver,
        c,
        alice,
        bob,
        ..
    } = two_in_a_group("Lunch").await?;
    send(&alice, "noodles at noon?").await?;
    let message = |text: &str| {
        format!(
            "[...document.querySelectorAll('#messages .message')]\
             .find(m => m.querySelector('.text')?.textContent === {text:?})"
        )
    };
    until(
        &bob,
        "alice's question",
        &format!("!!{}", message("noodles at noon?")),
    )
    .await?;

    // bob replies to it
    js(
        &bob,
        &format!(
            "{}.querySelector('button.reply').click()",
            message("noodles at noon?")
        ),
    )
    .await?;
    until(
        &bob,
        "the reply bar",
        "document.querySelector('#replying-text').textContent === 'Replying to alice: noodles at noon?'",
    )
    .await?;
    send(&bob, "yes, see you there").await?;
    for page in [&alice, &bob] {
        until(
            page,
            "the answer quotes the question",
            &format!(
                "{}?.querySelector('.reply-to')?.textContent === 'alice: noodles at noon?'",
                message("yes, see you there")
            ),
        )
        .await?;
    }
    assert_eq!(
        js(&bob, "document.querySelector('#replying').hidden").await?,
        json!(true)
    );

    // alice reacts to the answer, and takes it back
    let thumbs = format!(
        "{}.querySelector('button.react[data-emoji=\"👍\"]')",
        message("yes, see you there")
    );
    js(&alice, &format!("{thumbs}.click()")).await?;
    until(
        &alice,
        "alice's reaction pressed",
        &format!("{thumbs}.getAttribute('aria-pressed') === 'true'"),
    )
    .await?;
    let shown = format!(
        "{}?.querySelector('.reactions')?.textContent",
        message("yes, see you there")
    );
    until(&bob, "bob sees it", &format!("{shown} === '👍 1'")).await?;
    js(&alice, &format!("{thumbs}.click()")).await?;
    until(
        &bob,
        "and sees it taken back",
        &format!("{shown} === undefined"),
    )
    .await?;
    shot(&bob, "7-reply-and-reaction").await?;

    // with the group closed, bob is mentioned: the list marks it until he
    // opens it, and the message stands out
    js(&bob, "document.querySelector('#back').click()").await?;
    send(&alice, "@bob bring the menu").await?;
    let marked = "!!document.querySelector('#groups li[data-group-id] .mentioned')";
    until(&bob, "the group marked", marked).await?;
    open_group(&bob, "Lunch").await?;
    until(
        &bob,
        "the mention stands out",
        &format!(
            "{}?.classList.contains('mentions-me')",
            message("@bob bring the menu")
        ),
    )
    .await?;
    assert_eq!(js(&bob, marked).await?, json!(false), "the mark is gone");
    // naming oneself is no mention (the server tells no one either)
    send(&alice, "@alice note to self").await?;
    until(
        &alice,
        "the note shown",
        &format!("!!{}", message("@alice note to self")),
    )
    .await?;
    assert_eq!(
        js(
            &alice,
            &format!(
                "{}.classList.contains('mentions-me')",
                message("@alice note to self")
            )
        )
        .await?,
        json!(false),
        "one's own message never stands out"
    );
    alice.close().await?;
    bob.close().await?;
    c.stop().await
}

/// A user blocks and unblocks someone in the web client: the block is the
/// server's (the blocked user's group creation with them is refused, it is
/// listed again after a reload), and a refused block shows its error.
#[tokio::test]
async fn a_user_blocks_and_unblocks_someone_in_a_real_browser() -> anyhow::Result<()> {
    use reqwest::Method;
    let driver = Driver::start().await?;
    let c = Cluster::start_with(1, 1, &["--dev-tokens"]).await?;
    let base = c.edge_url(0);
    let bob = driver.browser("bob").await?;
    sign_in(&bob, &base, "bob").await?;
    let listed = "document.querySelector('#blocks li[data-user-id=\"mallory\"]')";
    let mallory_creates = || async {
        let body = json!({ "name": "spam", "members": ["bob"] });
        let (status, _) = c
            .call(Method::POST, 0, Some("mallory"), "/groups", Some(&body))
            .await?;
        anyhow::Ok(status)
    };

    el(&bob, "#block-user").await?.send_keys("mallory").await?;
    js(
        &bob,
        "document.querySelector('#block-form').requestSubmit()",
    )
    .await?;
    until(&bob, "mallory listed as blocked", &format!("!!{listed}")).await?;
    eventually(WAIT, || async {
        let (_, list) = c.get(0, "bob", "/blocks").await?;
        Ok((list["blocks"][0]["userId"] == "mallory").then_some(()))
    })
    .await
    .context("the server holds the block")?;
    assert_eq!(mallory_creates().await?, 403, "mallory may not add bob");
    shot(&bob, "5-blocked").await?;

    // the list is the server's: still there after a reload
    bob.goto(&format!("{base}/app/")).await?;
    until(
        &bob,
        "mallory listed after a reload",
        &format!("!!{listed}"),
    )
    .await?;

    // blocking oneself is refused, with the server's code shown
    el(&bob, "#block-user").await?.send_keys("bob").await?;
    js(
        &bob,
        "document.querySelector('#block-form').requestSubmit()",
    )
    .await?;
    until(
        &bob,
        "the server's invalid error shown",
        "document.querySelector('#error')?.dataset.code === 'invalid'",
    )
    .await?;
    until(
        &bob,
        "only mallory listed",
        "document.querySelectorAll('#blocks li').length === 1",
    )
    .await?;

    // unblocked: gone from the list and from the server
    js(&bob, &format!("{listed}.querySelector('button').click()")).await?;
    until(&bob, "mallory no longer listed", &format!("!{listed}")).await?;
    let (_, list) = c.get(0, "bob", "/blocks").await?;
    assert_eq!(list, json!({ "blocks": [] }));
    assert_eq!(mallory_creates().await?, 201, "mallory may add bob again");

    bob.close().await?;
    c.stop().await?;
    Ok(())
}

/// A token in a link (`/app/#token=…`) signs the reader in only on a
/// development server (its sign-in links): elsewhere anyone could send a
/// link with their own token in it and have the reader write into their
/// account. There the token is only offered in the form, saying whose it
/// is, it leaves the address bar, and the reader's own saved sign-in wins
/// over it.
#[tokio::test]
async fn a_linked_token_signs_in_by_itself_only_on_a_development_server() -> anyhow::Result<()> {
    let driver = Driver::start().await?;
    let reader = driver.browser("reader").await?;
    let mallory = chat_tests::token("mallory");
    let signed_in_as = |user: &str| {
        format!(
            "!document.querySelector('#app').hidden && \
             document.querySelector('#whoami').textContent.includes('{user}')"
        )
    };

    let c = Cluster::start(1, 1).await?;
    let base = c.edge_url(0);
    reader.goto(&format!("{base}/app/#token={mallory}")).await?;
    until(
        &reader,
        "the linked token offered",
        "document.querySelector('#linked-token')?.hidden === false",
    )
    .await?;
    let note = js(
        &reader,
        "document.querySelector('#linked-token').textContent",
    )
    .await?;
    assert!(
        note.as_str().is_some_and(|n| n.contains("\"mallory\"")),
        "{note}"
    );
    assert_eq!(
        js(&reader, "document.querySelector('#app').hidden").await?,
        true
    );
    assert_eq!(
        js(&reader, "document.querySelector('#token').value").await?,
        mallory.as_str()
    );
    assert_eq!(
        js(&reader, "location.hash").await?,
        "",
        "the token left the address bar"
    );

    // the reader signs in as itself; a link later changes nothing
    js(
        &reader,
        &format!(
            "(document.querySelector('#token').value = '{}', \
             document.querySelector('#signin-form').requestSubmit(), true)",
            chat_tests::token("reader")
        ),
    )
    .await?;
    until(&reader, "signed in as the reader", &signed_in_as("reader")).await?;
    reader.goto(&format!("{base}/app/#token={mallory}")).await?;
    until(
        &reader,
        "still the reader after a link",
        &signed_in_as("reader"),
    )
    .await?;
    assert_eq!(
        js(
            &reader,
            "document.querySelector('#whoami').textContent.includes('mallory')"
        )
        .await?,
        false
    );
    c.stop().await?;

    // on a development server the link signs in by itself
    let c = Cluster::start_with(1, 1, &["--dev-tokens"]).await?;
    let base = c.edge_url(0);
    let fresh = driver.browser("fresh").await?;
    fresh
        .goto(&format!("{base}/app/#token={}", chat_tests::token("dana")))
        .await?;
    until(&fresh, "signed in by the link", &signed_in_as("dana")).await?;
    c.stop().await
}
