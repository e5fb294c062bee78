//! Validated identifiers.
//!
//! User, group and device ids end up in NATS subjects and consumer names, so
//! they are restricted to characters that are safe in both: ASCII letters,
//! digits, `-` and `_` (no `.`, `*`, `>` or whitespace).

use std::fmt;

use crate::DomainError;

fn check(kind: &str, s: &str, max: usize) -> Result<(), DomainError> {
    if s.is_empty() {
        return Err(DomainError::Invalid(format!("{kind} must not be empty")));
    }
    if s.len() > max {
        return Err(DomainError::Invalid(format!(
            "{kind} is longer than {max} characters"
        )));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(DomainError::Invalid(format!(
            "{kind} may only contain ASCII letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The longest accepted id, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` as an id.
            pub fn parse(s: impl Into<String>) -> Result<Self, DomainError> {
                let s = s.into();
                check($kind, &s, Self::MAX_LEN)?;
                Ok(Self(s))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// A user: the `sub` claim of the JWT.
    UserId,
    "user id",
    64
);
id_type!(
    /// A group, chosen by the server at creation.
    GroupId,
    "group id",
    64
);
id_type!(
    /// One device (or browser profile) of a user. Each device keeps its own
    /// delivery position, so every device receives every event once.
    DeviceId,
    "device id",
    32
);

id_type!(
    /// A message, chosen by the server (UUID v7: ordered by time).
    MessageId,
    "message id",
    64
);
id_type!(
    /// The id a client gives a message so that a retried send is recognised.
    ClientMsgId,
    "client message id",
    64
);

impl MessageId {
    /// A fresh message id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().simple().to_string())
    }
}

impl GroupId {
    /// A fresh, unguessable group id (UUID v4, 32 hex digits).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl DeviceId {
    /// The device used when a connection names none.
    pub fn default_device() -> Self {
        Self("default".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids() {
        assert_eq!(
            UserId::parse("alice_01-x").map(|u| u.0),
            Ok("alice_01-x".into())
        );
        assert!(GroupId::parse(GroupId::generate().as_str()).is_ok());
    }

    #[test]
    fn refuses_subject_breaking_and_oversized_ids() {
        for bad in ["", "a.b", "a*", "a>", "a b", "é", "a/b"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(UserId::parse("x".repeat(64)).is_ok());
        assert!(UserId::parse("x".repeat(65)).is_err());
        assert!(DeviceId::parse("d".repeat(33)).is_err());
    }
}
