//! Encryption at rest of message content (text and media metadata):
//! AES-256-GCM with a fresh random 96-bit nonce per message and the key id
//! stored beside the ciphertext, from a key ring so that keys can be rotated
//! while old messages still decrypt.
//!
//! The associated data binds a ciphertext to its message: id, group, sender
//! and seq ([`MessageBinding`]), so a ciphertext copied onto another message,
//! replayed in another group, under another sender or at another position
//! does not decrypt. Messages sealed before that binding (version 1) bound
//! the message id only and still open.

use std::collections::HashMap;

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use rand::RngCore;

const NONCE_LEN: usize = 12;

/// A key-ring problem at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("no encryption keys configured")]
    Empty,
    #[error("key {0:?}: expected ID:BASE64 with a 32-byte key")]
    Malformed(String),
    #[error("key id {0:?} appears twice")]
    Duplicate(String),
    #[error("key ids may only contain ASCII letters, digits, '-' and '_' (got {0:?})")]
    BadId(String),
}

/// A ciphertext could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    #[error("ciphertext does not authenticate")]
    Tampered,
    #[error("plaintext is not UTF-8")]
    NotText,
}

/// What a message's ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct MessageBinding<'a> {
    pub message_id: &'a str,
    pub group_id: &'a str,
    pub sender_id: &'a str,
    pub seq: u64,
}

/// The binding of the first messages: the message id only.
pub const BINDING_V1: u8 = 1;
/// Message id, group, sender and seq.
pub const BINDING_V2: u8 = 2;

impl MessageBinding<'_> {
    /// The associated data of `version` (anything but 2 is version 1).
    /// Version 2 prefixes every field with its length, so no two bindings
    /// give the same bytes.
    pub fn aad(&self, version: u8) -> Vec<u8> {
        if version != BINDING_V2 {
            return self.message_id.as_bytes().to_vec();
        }
        let mut aad = b"chat-message-v2".to_vec();
        for field in [self.message_id, self.group_id, self.sender_id] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        aad.extend_from_slice(&self.seq.to_be_bytes());
        aad
    }
}

/// Content as stored: which key, which nonce, the ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The configured keys; the first one encrypts, all of them decrypt.
#[derive(Clone)]
pub struct KeyRing {
    current: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // key material is never printed
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("ids", &ids)
            .finish()
    }
}

impl KeyRing {
    /// Parses `ID:BASE64KEY` entries; the first is the current key.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, KeyRingError> {
        let mut keys = HashMap::new();
        let mut current = None;
        for entry in entries {
            let entry = entry.as_ref().trim();
            // never echo key material in errors: only the id part
            let (id, b64) = entry
                .split_once(':')
                .ok_or_else(|| KeyRingError::Malformed("<no id>".into()))?;
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(KeyRingError::BadId(id.chars().take(32).collect()));
            }
            let bytes = B64
                .decode(b64)
                .map_err(|_| KeyRingError::Malformed(id.to_owned()))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| KeyRingError::Malformed(id.to_owned()))?;
            if keys.insert(id.to_owned(), cipher).is_some() {
                return Err(KeyRingError::Duplicate(id.to_owned()));
            }
            current.get_or_insert_with(|| id.to_owned());
        }
        Ok(Self {
            current: current.ok_or(KeyRingError::Empty)?,
            keys,
        })
    }

    /// A fresh random key as `ID:BASE64`, for configuration.
    pub fn generate_entry(id: &str) -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{id}:{}", B64.encode(key))
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Encrypts `plaintext` for the message `aad` (its id) with the current key.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = &self.keys[&self.current];
        let ciphertext = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // AES-GCM encryption fails only past 64 GiB of plaintext
            .unwrap_or_default();
        Sealed {
            key_id: self.current.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts and authenticates `sealed` for the message `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        let nonce: [u8; NONCE_LEN] = sealed
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Tampered)?;
        cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)
    }

    /// [`KeyRing::open`] for text.
    pub fn open_text(&self, sealed: &Sealed, aad: &[u8]) -> Result<String, CryptoError> {
        String::from_utf8(self.open(sealed, aad)?).map_err(|_| CryptoError::NotText)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_with_fresh_nonces() {
        let ring = KeyRing::parse(&[KeyRing::generate_entry("k1")]).expect("ring");
        let a = ring.seal(b"hello", b"m1");
        let b = ring.seal(b"hello", b"m1");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(!a.ciphertext.windows(5).any(|w| w == b"hello"));
        assert_eq!(ring.open_text(&a, b"m1").expect("opens"), "hello");
    }

    #[test]
    fn tampering_another_message_id_or_unknown_key_fail() {
        let ring = KeyRing::parse(&[KeyRing::generate_entry("k1")]).expect("ring");
        let mut s = ring.seal(b"hello", b"m1");
        assert!(matches!(ring.open(&s, b"m2"), Err(CryptoError::Tampered)));
        s.ciphertext[0] ^= 1;
        assert!(matches!(ring.open(&s, b"m1"), Err(CryptoError::Tampered)));
        s.key_id = "nope".into();
        assert!(matches!(
            ring.open(&s, b"m1"),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn version_2_binds_group_sender_and_seq() {
        let ring = KeyRing::parse(&[KeyRing::generate_entry("k1")]).expect("ring");
        let b = MessageBinding {
            message_id: "m1",
            group_id: "g1",
            sender_id: "alice",
            seq: 7,
        };
        let sealed = ring.seal(b"hello", &b.aad(BINDING_V2));
        assert_eq!(
            ring.open_text(&sealed, &b.aad(BINDING_V2)).expect("opens"),
            "hello"
        );
        for other in [
            MessageBinding {
                group_id: "g2",
                ..b
            },
            MessageBinding {
                sender_id: "mallory",
                ..b
            },
            MessageBinding { seq: 8, ..b },
            MessageBinding {
                message_id: "m2",
                ..b
            },
            // the length prefixes keep shifted boundaries apart
            MessageBinding {
                group_id: "g1a",
                sender_id: "lice",
                ..b
            },
        ] {
            assert!(
                ring.open(&sealed, &other.aad(BINDING_V2)).is_err(),
                "{other:?}"
            );
        }
        // version 1 binds the message id only, and still opens
        let old = ring.seal(b"before", b"m1");
        assert_eq!(
            ring.open_text(&old, &b.aad(BINDING_V1)).expect("opens"),
            "before"
        );
        assert!(ring.open(&old, &b.aad(BINDING_V2)).is_err());
    }

    #[test]
    fn rotation_keeps_old_messages_readable() {
        let old = KeyRing::generate_entry("k1");
        let ring1 = KeyRing::parse(std::slice::from_ref(&old)).expect("ring");
        let sealed = ring1.seal(b"before rotation", b"m");
        let ring2 = KeyRing::parse(&[KeyRing::generate_entry("k2"), old]).expect("ring");
        assert_eq!(ring2.current_id(), "k2");
        assert_eq!(ring2.seal(b"x", b"m").key_id, "k2");
        assert_eq!(
            ring2.open_text(&sealed, b"m").expect("old key still opens"),
            "before rotation"
        );
    }

    #[test]
    fn bad_configuration_is_refused_without_echoing_keys() {
        let e = KeyRing::parse(&["k1:c2hvcnQ="]).expect_err("short key");
        assert!(!e.to_string().contains("c2hvcnQ"));
        assert!(KeyRing::parse::<&str>(&[]).is_err());
        assert!(KeyRing::parse(&["nokey"]).is_err());
        let k = KeyRing::generate_entry("k1");
        assert!(matches!(
            KeyRing::parse(&[k.clone(), k]),
            Err(KeyRingError::Duplicate(_))
        ));
        assert!(KeyRing::parse(&[KeyRing::generate_entry("a.b")]).is_err());
    }
}
