//! The query audit (`scripts/audit-queries`): with `CHAT_QUERY_AUDIT` set to
//! a file, every cluster's database profiles each operation, and when the
//! cluster stops, each query the nodes made (the client named `chatd`, so
//! not a test's own reads) is explained against the indexes as they are
//! then; those whose plan scans the whole collection are appended to the
//! file, one line each, with the test that made them. Needs a server that
//! profiles and explains as mongod does: SecantusDB's Rust daemon
//! (`CHAT_MONGOD=secantusd-rs`), not the Python stand-in. A profile holds
//! the last 1 MB of operations, so a long test is audited on its last ones.

use std::{io::Write, path::Path};

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::{
    Database,
    bson::{Bson, Document, doc},
};

/// The database the nodes use.
const DB: &str = "chat";

/// Profiles every operation on the nodes' database from now on.
pub(crate) async fn start(uri: &str) -> anyhow::Result<()> {
    mongodb::Client::with_uri_str(uri)
        .await?
        .database(DB)
        .run_command(doc! { "profile": 2 })
        .await
        .context("the server does not profile: run the audit with CHAT_MONGOD=secantusd-rs")?;
    Ok(())
}

/// The filter and sort of a profiled read or write, as a `find` to
/// explain (`None`: not a query, or an empty one).
fn as_find(entry: &Document) -> Option<(String, Document)> {
    let coll = entry.get_str("ns").ok()?.strip_prefix("chat.")?.to_owned();
    if coll.starts_with("system.") || entry.get_str("appName").ok() != Some("chatd") {
        return None;
    }
    let command = entry.get_document("command").ok()?;
    let filter = match entry.get_str("op").ok()? {
        "query" => command.get_document("filter").ok()?,
        "update" | "remove" => command.get_document("q").ok()?,
        // count, findAndModify
        "command" => command
            .get_document("query")
            .ok()
            .or_else(|| command.get_document("filter").ok())?,
        _ => return None,
    };
    if filter.is_empty() {
        return None;
    }
    let mut find = doc! { "find": coll.as_str(), "filter": filter.clone() };
    if let Ok(sort) = command.get_document("sort") {
        find.insert("sort", sort.clone());
    }
    Some((coll, find))
}

/// Whether a plan (or any stage under it) reads the whole collection.
fn scans(plan: &Bson) -> bool {
    match plan {
        Bson::Document(d) => d.get_str("stage").ok() == Some("COLLSCAN") || d.values().any(scans),
        Bson::Array(a) => a.iter().any(scans),
        _ => false,
    }
}

/// Appends to `report` the nodes' profiled queries that scan a collection.
pub(crate) async fn report(db: &Database, report: &Path) -> anyhow::Result<()> {
    let entries: Vec<Document> = db
        .collection::<Document>("system.profile")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let mut found = Vec::new();
    for (coll, find) in entries.iter().filter_map(as_find) {
        let explained = db
            .run_command(doc! { "explain": find.clone(), "verbosity": "queryPlanner" })
            .await?;
        let plan = explained
            .get_document("queryPlanner")
            .ok()
            .and_then(|q| q.get("winningPlan"))
            .cloned()
            .unwrap_or(Bson::Null);
        if scans(&plan) {
            found.push(format!("{coll}\t{}\t{test}", Bson::Document(find)));
        }
    }
    if !found.is_empty() {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(report)?;
        for line in found {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_non_empty_queries_are_explained() {
        let entry = |op: &str, app: &str, command: Document| {
            doc! { "op": op, "ns": "chat.uploads", "appName": app, "command": command }
        };
        let find = doc! { "find": "uploads", "filter": { "deleting": true }, "sort": { "at": -1 } };
        assert_eq!(
            as_find(&entry("query", "chatd", find.clone())),
            Some(("uploads".to_owned(), find.clone()))
        );
        // a statement of an update, a count
        let update = doc! { "q": { "_id": "k" }, "u": { "$set": { "x": 1 } } };
        assert_eq!(
            as_find(&entry("update", "chatd", update)).map(|(_, f)| f),
            Some(doc! { "find": "uploads", "filter": { "_id": "k" } })
        );
        let count = doc! { "count": "uploads", "query": { "by": "u" } };
        assert!(as_find(&entry("command", "chatd", count)).is_some());
        // a test's own read, an empty filter, the profile itself
        assert_eq!(as_find(&entry("query", "", find.clone())), None);
        let all = doc! { "find": "uploads", "filter": {} };
        assert_eq!(as_find(&entry("query", "chatd", all)), None);
        let mut own = entry("query", "chatd", find);
        own.insert("ns", "chat.system.profile");
        assert_eq!(as_find(&own), None);
    }

    #[test]
    fn a_scan_is_found_at_any_depth_of_a_plan() {
        let ixscan = doc! { "stage": "FETCH", "inputStage": { "stage": "IXSCAN" } };
        assert!(!scans(&Bson::Document(ixscan)));
        let under_or = doc! { "stage": "SUBPLAN", "inputStage": { "stage": "OR",
        "inputStages": [{ "stage": "IXSCAN" }, { "stage": "COLLSCAN" }] } };
        assert!(scans(&Bson::Document(under_or)));
    }
}
