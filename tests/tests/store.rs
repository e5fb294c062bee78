//! The write batcher against a real MongoDB-wire server: concurrent sends
//! share commands, yet each keeps its own result.

use chat_domain::{ClientMsgId, GroupId, MessageId, UserId};
use chat_store::{Store, StoredMessage};
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

    // commits in one go, each with its own seq
    let commits = join_all(
        stored
            .iter()
            .enumerate()
            .map(|(i, m)| store.messages.commit(&m.id, i as u64 + 1, i as u64 + 100)),
    )
    .await;
    for c in commits {
        c?;
    }
    for (i, m) in stored.iter().enumerate() {
        let got = store.messages.get(&m.id).await?.expect("stored");
        assert_eq!(got.seq, Some(i as u64 + 1), "{}", m.id);
        assert_eq!(got.stream_seq, Some(i as u64 + 100));
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
