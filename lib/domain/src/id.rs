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
impl UserId {
    /// What a request path says for "the caller"
    /// (`DELETE /groups/{id}/members/me`): reserved, so that no user has it
    /// (a member called `me` could never be removed).
    pub const ME: &'static str = "me";

    /// [`UserId::parse`] for an id that becomes a user or a member (a
    /// token's `sub`, a group's new members): refuses [`UserId::ME`].
    /// Stored ids are read with `parse`, so nothing stored before is lost.
    pub fn parse_new(s: impl Into<String>) -> Result<Self, DomainError> {
        let id = Self::parse(s)?;
        if id.0 == Self::ME {
            return Err(DomainError::Invalid(format!(
                "user id {:?} is reserved (it names the caller in paths)",
                Self::ME
            )));
        }
        Ok(id)
    }
}

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

impl ClientMsgId {
    /// A fresh client message id: a UUID v7, which says when it was minted
    /// (what the clients of this workspace send; see [`Self::minted_at`]).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().as_hyphenated().to_string())
    }

    /// When the client minted this id, by the client's clock, in
    /// milliseconds since the epoch, if it is a UUID v7 (hyphenated or 32 hex
    /// digits); `None` for any other id. The send log keeps the entries of
    /// such ids for a short while only (chat_bus::sends).
    pub fn minted_at(&self) -> Option<i64> {
        let u = uuid::Uuid::try_parse(&self.0).ok()?;
        if u.get_version_num() != 7 || u.get_variant() != uuid::Variant::RFC4122 {
            return None;
        }
        let (secs, nanos) = u.get_timestamp()?.to_unix();
        i64::try_from(secs)
            .ok()?
            .checked_mul(1000)?
            .checked_add(i64::from(nanos / 1_000_000))
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
    fn a_uuid_v7_client_id_says_when_it_was_minted() {
        let id = uuid::Uuid::now_v7();
        let ms = |s: String| ClientMsgId::parse(s).expect("id").minted_at();
        let when = ms(id.as_hyphenated().to_string()).expect("hyphenated v7");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        assert!((now - when).abs() < 5_000, "{when} is not about {now}");
        assert_eq!(ms(id.simple().to_string()), Some(when));
        assert_eq!(
            ms(id.as_hyphenated().to_string().to_uppercase()),
            Some(when)
        );
        // 2026-12-04T00:00:00Z is 1,796,342,400,000 ms: 0x01a2_3e59_c400
        assert_eq!(
            ms("01a23e59-c400-7000-8000-000000000000".into()),
            Some(1_796_342_400_000)
        );
        // a v4 id, a v7 with the wrong variant, ids that are not UUIDs
        assert_eq!(ms(uuid::Uuid::new_v4().simple().to_string()), None);
        assert_eq!(ms("01a23e59-c400-7000-c000-000000000000".into()), None);
        assert_eq!(ms("c-1".into()), None);
        assert_eq!(ms("01a1e6a63c0070008000000000000000aa".into()), None);
        assert!(ClientMsgId::generate().minted_at().is_some());
    }

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

    #[test]
    fn no_new_user_is_called_me() {
        assert!(UserId::parse_new("me").is_err());
        // stored ids still read, and ids that merely contain it are users
        assert!(UserId::parse("me").is_ok());
        for ok in ["Me", "me_", "meg", "name"] {
            assert!(UserId::parse_new(ok).is_ok(), "{ok:?} refused");
        }
    }
}
