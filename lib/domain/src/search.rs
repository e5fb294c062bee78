//! What a search of a group's messages looks for.
//!
//! Text is encrypted at rest, so the database cannot index it: a search
//! opens the group's messages newest first, a bounded number per request,
//! and keeps those whose text holds every word of the query, ignoring case.

use crate::DomainError;

/// Longest query, in characters (after trimming).
pub const SEARCH_QUERY_MAX_CHARS: usize = 100;
/// Most words in one query.
pub const SEARCH_QUERY_MAX_WORDS: usize = 10;

/// A parsed query: its words, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    words: Vec<String>,
}

impl SearchQuery {
    /// Parses what a member typed: 1 to [`SEARCH_QUERY_MAX_CHARS`]
    /// characters and at most [`SEARCH_QUERY_MAX_WORDS`] words, without
    /// control characters.
    pub fn parse(query: &str) -> Result<Self, DomainError> {
        let query = query.trim();
        if query.is_empty() {
            return Err(DomainError::Invalid("q must not be empty".into()));
        }
        let chars = query.chars().count();
        if chars > SEARCH_QUERY_MAX_CHARS {
            return Err(DomainError::TooLarge(format!(
                "q is {chars} characters; the limit is {SEARCH_QUERY_MAX_CHARS}"
            )));
        }
        if query.chars().any(char::is_control) {
            return Err(DomainError::Invalid(
                "q must not contain control characters".into(),
            ));
        }
        let mut words: Vec<String> = Vec::new();
        for w in query.split_whitespace().map(fold) {
            if !words.contains(&w) {
                words.push(w);
            }
        }
        if words.len() > SEARCH_QUERY_MAX_WORDS {
            return Err(DomainError::TooLarge(format!(
                "q has {} words; the limit is {SEARCH_QUERY_MAX_WORDS}",
                words.len()
            )));
        }
        Ok(Self { words })
    }

    /// Whether `text` holds every word of the query, ignoring case (a word
    /// may be part of a longer one: `deploy` finds `deployed`).
    pub fn matches(&self, text: &str) -> bool {
        let text = fold(text);
        self.words.iter().all(|w| text.contains(w.as_str()))
    }
}

/// `s` lower-cased for comparison. A final sigma is an ordinary one: Rust
/// lower-cases a word's last `Σ` to `ς`, so `ΟΔΟΣ` (a query) would not
/// otherwise be found in `ΟΔΟΣΤΡΩΜΑ`. (No Unicode normalisation: a
/// decomposed `é` does not match a composed one.)
fn fold(s: &str) -> String {
    s.to_lowercase().replace('ς', "σ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_must_appear_in_any_order_and_case() {
        let q = SearchQuery::parse("  Release NOTES ").expect("a query");
        assert!(q.matches("the notes for the release are out"));
        assert!(q.matches("RELEASENOTES"));
        assert!(!q.matches("the release is out"));
        assert!(!q.matches(""));
        // Unicode case folding, not ASCII only
        let q = SearchQuery::parse("ÉTÉ").expect("a query");
        assert!(q.matches("un été chaud"));
        // a final sigma is a sigma
        let q = SearchQuery::parse("ΟΔΟΣ").expect("a query");
        assert!(q.matches("ΟΔΟΣΤΡΩΜΑ"));
        assert!(q.matches("οδος"));
        // a repeated word counts once
        assert_eq!(
            SearchQuery::parse("a a A").expect("a query").words,
            vec!["a"]
        );
    }

    #[test]
    fn bad_queries_are_refused_with_a_reason() {
        for q in ["", "   ", "\t\n"] {
            assert!(
                matches!(SearchQuery::parse(q), Err(DomainError::Invalid(_))),
                "{q:?}"
            );
        }
        assert!(matches!(
            SearchQuery::parse("a\u{0}b"),
            Err(DomainError::Invalid(_))
        ));
        let longest = "é".repeat(SEARCH_QUERY_MAX_CHARS);
        assert!(SearchQuery::parse(&longest).is_ok());
        assert!(matches!(
            SearchQuery::parse(&format!("{longest}é")),
            Err(DomainError::TooLarge(_))
        ));
        let words: Vec<String> = (0..SEARCH_QUERY_MAX_WORDS)
            .map(|i| format!("w{i}"))
            .collect();
        assert!(SearchQuery::parse(&words.join(" ")).is_ok());
        assert!(matches!(
            SearchQuery::parse(&format!("{} more", words.join(" "))),
            Err(DomainError::TooLarge(_))
        ));
    }
}
