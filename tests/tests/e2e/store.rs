//! The store against a real MongoDB-wire server: projecting the stream's
//! messages (in one command, idempotent under redelivery, settling records
//! of the earlier send path) and group receipts.

use chat_domain::{ClientMsgId, GroupId, MessageId, UserId};
use chat_store::{Store, StoredMessage};
use mongodb::bson::{Document, doc};

fn message(group: &GroupId, client_id: &str, seq: u64) -> anyhow::Result<StoredMessage> {
    Ok(StoredMessage {
        id: MessageId::generate(),
        group_id: group.clone(),
        sender_id: UserId::parse("alice")?,
        client_msg_id: ClientMsgId::parse(client_id)?,
        kind: "text".into(),
        key_id: "k".into(),
        nonce: vec![seq as u8; 12],
        ciphertext: vec![1, 2, seq as u8],
        binding: 2,
        seq: Some(seq),
        stream_seq: Some(100 + seq),
        created_at: chat_domain::now_millis(),
        edited_at: None,
        deleted_at: None,
        version: 0,
    })
}

/// Edits and deletes applied as two workers' batches may bring them: out
/// of order and more than once. The newest edit by stream sequence wins,
/// and a delete wins over every edit, before or after it.
#[tokio::test]
async fn changes_apply_in_stream_order_whatever_order_they_come_in() -> anyhow::Result<()> {
    use chat_store::Resealed;
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "changes").await?;
    store.ensure_indexes().await?;
    let group = GroupId::generate();
    let m = message(&group, "c1", 1)?;
    store.messages.project(std::slice::from_ref(&m)).await?;
    let sealed = |b: u8| Resealed {
        key_id: "k".into(),
        nonce: vec![b; 12],
        ciphertext: vec![b; 3],
        binding: 2,
    };
    // the edit stored at stream sequence 300 comes before the one at 200
    assert!(
        store
            .messages
            .apply_edit(&m.id, 300, &sealed(3), 3_000)
            .await?
    );
    assert!(
        !store
            .messages
            .apply_edit(&m.id, 200, &sealed(2), 2_000)
            .await?
    );
    // again, as a redelivered batch: nothing changes
    assert!(
        !store
            .messages
            .apply_edit(&m.id, 300, &sealed(3), 3_000)
            .await?
    );
    let got = store.messages.get(&m.id).await?.expect("stored");
    assert_eq!((got.ciphertext, got.edited_at), (vec![3; 3], Some(3_000)));

    let alice = UserId::parse("alice")?;
    // the delete says which edit it found (the stream sequence to erase)
    assert_eq!(
        store
            .messages
            .apply_delete(&m.id, 250, &alice, 4_000)
            .await?,
        Some(300)
    );
    assert_eq!(
        store
            .messages
            .apply_delete(&m.id, 250, &alice, 4_000)
            .await?,
        None
    );
    // an edit after the delete (or one delivered late) brings nothing back
    assert!(
        !store
            .messages
            .apply_edit(&m.id, 400, &sealed(4), 5_000)
            .await?
    );
    let got = store.messages.get(&m.id).await?.expect("stored");
    assert!(got.is_deleted());
    assert!(got.ciphertext.is_empty() && got.nonce.is_empty());
    assert_eq!(got.seq, Some(1), "the tombstone keeps its place");
    Ok(())
}

#[tokio::test]
async fn projected_batches_are_idempotent_and_settle_earlier_records() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "project").await?;
    store.ensure_indexes().await?;
    let group = GroupId::generate();
    let msgs: Vec<StoredMessage> = (1..=40)
        .map(|i| message(&group, &format!("c{i}"), i))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(store.messages.project(&msgs[..30]).await?, 30);
    // a batch delivered again, overlapping the first: only the new ones count
    assert_eq!(store.messages.project(&msgs[20..]).await?, 10);
    let page = store.messages.history(&group, 0, None, 100).await?;
    let seqs: Vec<u64> = page.iter().filter_map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=40).rev().collect::<Vec<_>>(),
        "each once, in order"
    );
    for m in &msgs {
        let got = store.messages.get(&m.id).await?.expect("stored");
        assert_eq!(&got, m, "stored as the stream holds it");
    }
    assert_eq!(
        store.messages.last_committed(&group).await?,
        Some((40, 140))
    );

    // records of the earlier send path: a pending record of a message that
    // landed (committed now, keeping its client id), and one of an attempt
    // that never landed under a client id a later message uses (removed)
    let db = mongodb::Client::with_uri_str(&mongo.uri)
        .await?
        .database("project");
    let coll = db.collection::<Document>("messages");
    let landed = message(&group, "old-1", 41)?;
    let lost_id = MessageId::generate();
    // the earlier record was written when the message was made: same time
    // (`now()` here made the test fail when the millisecond ticked between)
    let made = mongodb::bson::DateTime::from_millis(landed.created_at);
    let pending = |id: &str, client: &str| {
        doc! {
            "_id": id, "groupId": group.as_str(), "senderId": "alice",
            "clientMsgId": client, "type": "text", "keyId": "k",
            "nonce": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![] },
            "ciphertext": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![] },
            "state": "pending", "createdAt": made,
            "updatedAt": made,
        }
    };
    coll.insert_many([
        pending(landed.id.as_str(), "old-1"),
        pending(lost_id.as_str(), "c42"),
    ])
    .await?;
    let reused = message(&group, "c42", 42)?;
    assert_eq!(
        store
            .messages
            .project(&[landed.clone(), reused.clone()])
            .await?,
        0,
        "both met an earlier record"
    );
    assert_eq!(store.messages.get(&landed.id).await?, Some(landed));
    assert_eq!(store.messages.get(&reused.id).await?, Some(reused));
    assert_eq!(store.messages.get(&lost_id).await?, None);
    assert_eq!(coll.count_documents(doc! { "state": "pending" }).await?, 0);

    // a client id used again after the send log forgot it: both messages
    // are in the stream, so both are in history
    let again = message(&group, "c1", 43)?;
    assert_eq!(
        store.messages.project(std::slice::from_ref(&again)).await?,
        0
    );
    let page = store.messages.history(&group, 0, None, 2).await?;
    assert_eq!(page.first().map(|m| &m.id), Some(&again.id));
    assert_eq!(page.first().and_then(|m| m.seq), Some(43));
    assert_eq!(
        page.first().map(|m| m.client_msg_id.as_str()),
        Some(again.id.as_str()),
        "stands for itself"
    );

    // with the database gone, a batch fails as a whole (and is held)
    drop(mongo);
    let late = message(&group, "late", 44)?;
    assert!(store.messages.project(&[late]).await.is_err());
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

#[tokio::test]
async fn subscribing_costs_one_small_write_and_old_subscriptions_still_count() -> anyhow::Result<()>
{
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "subscriptions").await?;
    store.ensure_indexes().await?;
    let id = |u: &str| UserId::parse(u);
    let (owner, old, new, stranger) = (id("owner")?, id("old")?, id("new")?, id("stranger")?);
    let members: Vec<UserId> = (0..997)
        .map(|i| id(&format!("m{i}")))
        .chain([Ok(old.clone()), Ok(new.clone())])
        .collect::<Result<_, _>>()?;
    let group = chat_domain::Group::create(
        GroupId::generate(),
        owner.clone(),
        "big",
        "",
        members,
        &chat_domain::Limits::default(),
        chat_domain::now_millis(),
    )?
    .with_history(chat_domain::History::Joined);
    store.groups.insert(&group).await?;
    // a subscription recorded the old way, in the group's document
    let db = mongodb::Client::with_uri_str(&mongo.uri)
        .await?
        .database("subscriptions");
    db.collection::<Document>("groups")
        .update_one(
            doc! { "_id": group.id.as_str() },
            doc! { "$set": { "subscribers": ["old"] } },
        )
        .await?;
    let rev = store.groups.get(&group.id).await?.expect("group").rev;

    let member = chat_store::Membership::Member { visible_from: 0 };
    assert_eq!(
        store.groups.add_subscriber(&group.id, &new).await?,
        (member, false),
        "new"
    );
    assert_eq!(
        store.groups.add_subscriber(&group.id, &stranger).await?,
        (chat_store::Membership::NotMember, false)
    );
    assert_eq!(
        store
            .groups
            .add_subscriber(&GroupId::generate(), &new)
            .await?,
        (chat_store::Membership::NoSuchGroup, false)
    );
    // the 1,000-member document was not rewritten
    assert_eq!(store.groups.get(&group.id).await?.expect("group").rev, rev);
    let just_this = vec![group.id.clone()];
    assert_eq!(store.groups.subscribed_groups(&new).await?, just_this);
    assert_eq!(store.groups.subscribed_groups(&old).await?, just_this);
    assert!(store.groups.subscribed_groups(&stranger).await?.is_empty());
    // twice is once, and says it was there
    assert_eq!(
        store.groups.add_subscriber(&group.id, &new).await?,
        (member, true)
    );
    assert_eq!(store.groups.subscribed_groups(&new).await?.len(), 1);

    // membership reads carry where the member's history starts, and read
    // only that member of the 1,000
    use chat_store::Membership;
    let late = id("late")?;
    let mut record = store.groups.get(&group.id).await?.expect("group");
    record.group.members.push(chat_domain::Member {
        user_id: late.clone(),
        joined_at: 0,
        joined_seq: 9,
    });
    assert!(store.groups.replace_if_rev(&record).await?);
    let membership = |u: UserId| {
        let (store, g) = (store.clone(), group.id.clone());
        async move { store.groups.membership(&g, &u).await }
    };
    assert_eq!(
        membership(late.clone()).await?,
        Membership::Member { visible_from: 9 }
    );
    assert_eq!(
        membership(new.clone()).await?,
        Membership::Member { visible_from: 0 }
    );
    assert_eq!(membership(stranger.clone()).await?, Membership::NotMember);
    assert_eq!(
        store.groups.membership(&GroupId::generate(), &late).await?,
        Membership::NoSuchGroup
    );
    // a document of an earlier version has no setting: shared history
    db.collection::<Document>("groups")
        .update_one(
            doc! { "_id": group.id.as_str() },
            doc! { "$unset": { "history": "" } },
        )
        .await?;
    assert_eq!(
        membership(late.clone()).await?,
        Membership::Member { visible_from: 0 }
    );

    // a member who leaves no longer counts, whichever way it subscribed
    let mut record = store.groups.get(&group.id).await?.expect("group");
    record
        .group
        .members
        .retain(|m| m.user_id != old && m.user_id != new);
    assert!(store.groups.replace_if_rev(&record).await?);
    assert!(store.groups.subscribed_groups(&old).await?.is_empty());
    assert!(store.groups.subscribed_groups(&new).await?.is_empty());
    store.groups.remove_subscriber(&group.id, &new).await?;
    let left = db
        .collection::<Document>("subscriptions")
        .count_documents(doc! {})
        .await?;
    assert_eq!(left, 0, "the removal's subscription is deleted");
    Ok(())
}

/// A page of `GET /groups` read every group it might list, members and
/// all (100 groups of 1,000 members: about 7 MB of MongoDB a request), to
/// list as many as fit the members cap. Now it reads at most one group past
/// the cap, whatever the page's limit.
#[tokio::test]
async fn a_page_of_large_groups_reads_no_more_groups_than_it_can_list() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "listing").await?;
    store.ensure_indexes().await?;
    let victim = UserId::parse("victim")?;
    for g in 0..20 {
        let members = (0..9)
            .map(|i| UserId::parse(format!("m{g}x{i}")))
            .chain([Ok(victim.clone())])
            .collect::<Result<_, _>>()?;
        let group = chat_domain::Group::create(
            GroupId::generate(),
            UserId::parse("owner")?,
            &format!("g{g}"),
            "",
            members,
            &chat_domain::Limits::default(),
            chat_domain::now_millis() + g,
        )?;
        store.groups.insert(&group).await?;
    }
    // 11 members a group (owner, 9, victim): the third takes them past 25
    // and tells there is more
    let page = store.groups.list_for_member(&victim, 100, None, 25).await?;
    let names: Vec<&str> = page.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["g19", "g18", "g17"], "newest first");
    // exactly at the cap is not past it
    let page = store.groups.list_for_member(&victim, 100, None, 22).await?;
    assert_eq!(page.len(), 3);
    // a cap no group passes: the limit
    assert_eq!(
        store
            .groups
            .list_for_member(&victim, 7, None, 1_000)
            .await?
            .len(),
        7
    );
    // the first group alone past the cap, and one more
    assert_eq!(
        store
            .groups
            .list_for_member(&victim, 100, None, 5)
            .await?
            .len(),
        2
    );
    Ok(())
}

/// The members among several users, in one read: those who are not are
/// left out, and each member's view starts where its group's history
/// setting says.
#[tokio::test]
async fn members_among_several_users_are_read_at_once() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "among").await?;
    store.ensure_indexes().await?;
    let id = |u: &str| UserId::parse(u);
    let (owner, bob, carol) = (id("owner")?, id("bob")?, id("carol")?);
    let create = |history| {
        chat_domain::Group::create(
            GroupId::generate(),
            owner.clone(),
            "g",
            "",
            vec![bob.clone(), carol.clone()],
            &chat_domain::Limits::default(),
            chat_domain::now_millis(),
        )
        .map(|g| g.with_history(history))
    };
    let shared = create(chat_domain::History::Shared)?;
    store.groups.insert(&shared).await?;
    let asked = [bob.clone(), id("mallory")?, carol.clone(), id("eve")?];
    let mut found = store
        .groups
        .members_among(&shared.id, &asked)
        .await?
        .expect("the group");
    found.sort();
    assert_eq!(found, [(bob.clone(), 0), (carol.clone(), 0)]);
    let mut joined = create(chat_domain::History::Joined)?;
    joined.members[1].joined_seq = 7;
    store.groups.insert(&joined).await?;
    let found = store
        .groups
        .members_among(&joined.id, &[joined.members[1].user_id.clone()])
        .await?;
    assert_eq!(found, Some(vec![(joined.members[1].user_id.clone(), 7)]));
    assert_eq!(
        store
            .groups
            .members_among(&GroupId::generate(), &asked)
            .await?,
        None
    );
    Ok(())
}

/// A mute lasts until its end (or for ever), muting again replaces the
/// end, and each read is of one group's mutes or one user's page of
/// groups, expired mutes left out.
#[tokio::test]
async fn mutes_last_until_their_end_and_are_read_per_group_and_per_user() -> anyhow::Result<()> {
    let mongo = chat_stack::Mongo::start().await?;
    let store = Store::connect(&mongo.uri, "mutes").await?;
    store.ensure_indexes().await?;
    let (g, other) = (GroupId::generate(), GroupId::generate());
    let (alice, bob, carol) = (
        UserId::parse("alice")?,
        UserId::parse("bob")?,
        UserId::parse("carol")?,
    );
    let now = 1_000_000;
    store
        .mutes
        .mute(&g, &alice, chat_store::MUTED_FOREVER)
        .await?;
    store.mutes.mute(&g, &bob, now + 10).await?;
    store.mutes.mute(&g, &carol, now - 1).await?;
    store.mutes.mute(&other, &alice, now + 5).await?;
    let mut muted = store.mutes.muted_in(&g, now).await?;
    muted.sort();
    assert_eq!(muted, ["alice", "bob"], "carol's mute has ended");
    assert_eq!(store.mutes.muted_in(&g, now + 10).await?, ["alice"]);
    // muting again replaces the end
    store
        .mutes
        .mute(&g, &bob, chat_store::MUTED_FOREVER)
        .await?;
    assert_eq!(store.mutes.muted_in(&g, now + 10).await?.len(), 2);
    // one user's page
    let page = store
        .mutes
        .of_user(
            &alice,
            &[g.clone(), other.clone(), GroupId::generate()],
            now,
        )
        .await?;
    assert_eq!(page.len(), 2);
    assert_eq!(page.get(&g), Some(&chat_store::MUTED_FOREVER));
    assert_eq!(page.get(&other), Some(&(now + 5)));
    assert!(store.mutes.of_user(&alice, &[], now).await?.is_empty());
    // ended ones are purged, lasting ones stay
    assert_eq!(store.mutes.purge_ended(now).await?, 1, "carol's");
    assert_eq!(store.mutes.purge_ended(now).await?, 0);
    assert_eq!(store.mutes.muted_in(&g, now).await?.len(), 2);
    // unmuting says whether there was one
    assert!(store.mutes.unmute(&g, &alice).await?);
    assert!(!store.mutes.unmute(&g, &alice).await?);
    assert_eq!(store.mutes.muted_in(&g, now).await?, ["bob"]);
    Ok(())
}
