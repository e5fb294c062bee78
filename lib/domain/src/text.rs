//! Invisible characters in user-visible strings.
//!
//! Unicode's format characters (general category `Cf`) are invisible: bidi
//! overrides and isolates reorder what follows them (`"gnp.exe"` shown as
//! `"exe.png"`), zero-width spaces make two names that look alike differ.
//! Names (group names, descriptions, display names) may contain none of
//! them except the two that emoji need: the zero-width joiner (family and
//! profession emoji) and tag characters (subdivision flags). Message text
//! keeps the joiners and the plain direction marks that right-to-left
//! scripts use, and refuses the overrides and isolates.

/// The `Cf` ranges of Unicode 15.1 (inclusive).
const FORMAT: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` is a format character (`Cf`).
pub fn is_format(c: char) -> bool {
    let c = u32::from(c);
    FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Zero-width joiner and emoji tags: format characters emoji need.
fn emoji_format(c: char) -> bool {
    c == '\u{200D}' || ('\u{E0020}'..='\u{E007F}').contains(&c)
}

/// Bidi embeddings, overrides and isolates: what reorders text.
pub fn is_bidi_control(c: char) -> bool {
    ('\u{202A}'..='\u{202E}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// The first character a name may not contain: a control or an invisible
/// format character other than those emoji need.
pub fn forbidden_in_name(s: &str) -> Option<char> {
    s.chars()
        .find(|&c| c.is_control() || (is_format(c) && !emoji_format(c)))
}

/// The first character message text may not contain: a bidi override or
/// isolate (controls other than newline and tab too).
pub fn forbidden_in_text(s: &str) -> Option<char> {
    s.chars()
        .find(|&c| is_bidi_control(c) || (c.is_control() && c != '\n' && c != '\t' && c != '\r'))
}

/// `s` without the characters a name may not contain: for values the
/// server receives from elsewhere (a token's `name` claim) and shows.
pub fn strip_for_name(s: &str) -> String {
    s.chars()
        .filter(|&c| !(c.is_control() || (is_format(c) && !emoji_format(c))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_invisible_and_reordering_characters() {
        for bad in [
            "team\u{202E}gnp.exe",
            "a\u{200B}b",
            "\u{FEFF}x",
            "x\u{2066}y",
            "soft\u{00AD}hyphen",
            "line\nbreak",
        ] {
            assert!(forbidden_in_name(bad).is_some(), "{bad:?} accepted");
        }
        // family emoji (ZWJ) and the flag of England (tags) are fine
        for good in [
            "team 👨‍👩‍👧",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
            "Équipe",
            "فريق",
        ] {
            assert_eq!(forbidden_in_name(good), None, "{good:?} refused");
        }
        assert_eq!(strip_for_name("Al\u{202E}ice\u{200B}"), "Alice");
    }

    #[test]
    fn text_keeps_direction_marks_and_refuses_overrides() {
        assert_eq!(forbidden_in_text("שלום \u{200F}hello\nline 2\tx"), None);
        assert_eq!(forbidden_in_text("a\u{202E}b"), Some('\u{202E}'));
        assert_eq!(forbidden_in_text("a\u{2067}b"), Some('\u{2067}'));
        assert_eq!(forbidden_in_text("bell\u{7}"), Some('\u{7}'));
    }
}
