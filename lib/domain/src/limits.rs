//! Configurable input limits, with the defaults the product ships.

/// Input limits that every layer enforces; configured on the worker (which
/// owns validation) and the edge (which refuses oversized frames early).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest group name, in characters.
    pub group_name_chars: usize,
    /// Longest group description, in characters.
    pub group_description_chars: usize,
    /// Most members in one group, owner included.
    pub group_members: usize,
    /// Longest text message, in bytes of UTF-8.
    pub text_bytes: usize,
    /// Most pinned messages in one group.
    pub group_pins: usize,
    /// Most invites of one group valid at once.
    pub group_invites: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            group_name_chars: 128,
            group_description_chars: 2048,
            group_members: 1000,
            text_bytes: 16 * 1024,
            group_pins: 50,
            group_invites: 20,
        }
    }
}
