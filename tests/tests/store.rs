//! The store against a real MongoDB-wire server: the write batcher
//! (concurrent sends share commands, yet each keeps its own result) and
//! group receipts.

use chat_domain::{ClientMsgId, GroupId, MessageId, UserId};
use chat_store::{Published, Store, StoredMessage};
use futures::future::join_all;

fn message(group: &GroupId, client_id: &str) -> anyhow::Result<StoredMessage> {
    Ok(StoredMessage {
        id: MessageId::generate(),
        group_id: group.clone(),
        sender_id: UserId::parse("alice")?,
        client_msg_id: ClientMsgId::parse(client_id)?,
        kind: "text".into(),
        key_id: "k".into(),
        nonce: vec![0; 12],
        ciphertext: vec![1, 2, 3],
        binding: 2,
        seq: None,
        stream_seq: None,
        after_stream_seq: 0,
        created_at: chat_domain::now_millis(),
    })
}

#[tokio::test]
async fn batched_inserts_and_commits_answer_each_caller() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "batch").await?;
    store.ensure_indexes().await?;
    let group = GroupId::generate();
    // 40 distinct client ids, each sent twice at once: the pairs land in the
    // same or neighbouring batches, and exactly one of each pair is stored
    let msgs: Vec<StoredMessage> = (0..80)
        .map(|i| message(&group, &format!("c{}", i % 40)))
        .collect::<anyhow::Result<_>>()?;
    let inserted = join_all(msgs.iter().map(|m| store.messages.insert_pending(m))).await;
    let mut stored = Vec::new();
    for (m, r) in msgs.iter().zip(inserted) {
        if r? {
            stored.push(m);
        }
    }
    assert_eq!(stored.len(), 40, "one message per client id");
    let mut ids: Vec<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40);

    // commits in one go, each with its own seq and content
    let content = |i: usize| Published {
        key_id: "k2".into(),
        nonce: vec![i as u8; 12],
        ciphertext: vec![i as u8, 9],
        binding: 2,
    };
    let contents: Vec<Published> = (0..stored.len()).map(content).collect();
    let commits = join_all(stored.iter().zip(&contents).enumerate().map(|(i, (m, c))| {
        store
            .messages
            .commit(&m.id, i as u64 + 1, i as u64 + 100, c)
    }))
    .await;
    for c in commits {
        c?;
    }
    for (i, m) in stored.iter().enumerate() {
        let got = store.messages.get(&m.id).await?.expect("stored");
        assert_eq!(got.seq, Some(i as u64 + 1), "{}", m.id);
        assert_eq!(got.stream_seq, Some(i as u64 + 100));
        assert_eq!(
            (got.key_id, got.nonce, got.ciphertext, got.binding),
            (
                "k2".to_owned(),
                contents[i].nonce.clone(),
                contents[i].ciphertext.clone(),
                2
            )
        );
    }

    // with the database gone, every caller of a batch hears of it
    drop(mongo);
    let failed = join_all((0..5).map(|i| {
        let m = message(&group, &format!("late{i}"));
        let store = store.clone();
        async move {
            store
                .messages
                .insert_pending(&m?)
                .await
                .map_err(anyhow::Error::from)
        }
    }))
    .await;
    assert!(failed.iter().all(|r| r.is_err()), "{failed:?}");
    Ok(())
}

#[tokio::test]
async fn receipts_rise_per_member_and_read_only_the_members_asked_for() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "receipts").await?;
    let group = GroupId::generate();
    let (alice, bob, carol) = (
        UserId::parse("alice")?,
        UserId::parse("bob")?,
        UserId::parse("carol")?,
    );
    let seqs = |risen: Vec<(UserId, chat_store::Receipt, chat_store::Receipt)>| {
        risen
            .into_iter()
            .map(|(u, b, a)| {
                let pair = |r: chat_store::Receipt| (r.delivered_seq, r.read_seq);
                (u.to_string(), pair(b), pair(a))
            })
            .collect::<Vec<_>>()
    };
    let first = store
        .messages
        .raise_receipts(&group, &[(alice.clone(), 5, 2), (bob.clone(), 7, 7)], 1)
        .await?;
    assert_eq!(
        seqs(first),
        [
            ("alice".into(), (0, 0), (5, 2)),
            ("bob".into(), (0, 0), (7, 7))
        ]
    );
    // one member's ack reads that member's entry: bob's lower report is
    // no rise, carol is new, and alice is untouched
    let second = store
        .messages
        .raise_receipts(&group, &[(bob.clone(), 3, 3), (carol.clone(), 1, 0)], 2)
        .await?;
    assert_eq!(
        seqs(second),
        [
            ("bob".into(), (7, 7), (7, 7)),
            ("carol".into(), (0, 0), (1, 0))
        ]
    );
    let mut all: Vec<(String, u64, u64)> = store
        .messages
        .receipts(&group)
        .await?
        .into_iter()
        .map(|(u, r)| (u.to_string(), r.delivered_seq, r.read_seq))
        .collect();
    all.sort();
    assert_eq!(
        all,
        [
            ("alice".into(), 5, 2),
            ("bob".into(), 7, 7),
            ("carol".into(), 1, 0)
        ]
    );
    Ok(())
}
