//! Authentication between edge and worker: a shared secret.
//!
//! Every call from an edge carries the secret in the `x-chat-service-secret`
//! metadata, which the worker compares in constant time. Before an edge sends
//! the secret to a worker at all, the worker proves it knows the secret too:
//! the edge's health check (`Health/Ready`, the one service without the
//! secret) carries a fresh random nonce, and only a worker that answers with
//! the nonce's HMAC-SHA256 under the secret is ever called. So a process that
//! takes over a worker's address learns nothing, and one that reaches a
//! worker's port without the secret is refused.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The metadata key carrying the secret on every call.
pub const SECRET_HEADER: &str = "x-chat-service-secret";
/// Shortest secret accepted, in bytes.
const MIN_LEN: usize = 32;

/// A secret that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the service secret must be at least {MIN_LEN} bytes")]
    TooShort,
    #[error("the service secret must be visible ASCII (it travels in a header)")]
    NotAscii,
}

/// The secret edges and workers share.
#[derive(Clone)]
pub struct ServiceSecret {
    secret: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for ServiceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never printed
        f.write_str("ServiceSecret(..)")
    }
}

impl ServiceSecret {
    /// Checks and keeps `secret`.
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if secret.len() < MIN_LEN {
            return Err(SecretError::TooShort);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::NotAscii);
        }
        Ok(Self {
            secret: secret.to_owned(),
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// The value an edge sends in [`SECRET_HEADER`].
    pub fn header_value(&self) -> &str {
        &self.secret
    }

    /// Whether `presented` is the secret. Compares digests in constant time,
    /// so neither the content nor the length leaks through timing.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(self.digest.ct_eq(&digest))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length
        <Hmac<Sha256> as Mac>::new_from_slice(self.secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"))
    }

    /// A worker's proof that it knows the secret, over an edge's `nonce`.
    pub fn proof(&self, nonce: &[u8]) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(b"chatd worker ready\0");
        mac.update(nonce);
        mac.finalize().into_bytes().to_vec()
    }

    /// Whether `proof` is the proof over `nonce` (constant time).
    pub fn verify_proof(&self, nonce: &[u8], proof: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(b"chatd worker ready\0");
        mac.update(nonce);
        mac.verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn short_or_unprintable_secrets_are_refused() {
        assert!(matches!(
            ServiceSecret::new("short"),
            Err(SecretError::TooShort)
        ));
        let spaced = format!("{SECRET} x");
        assert!(matches!(
            ServiceSecret::new(&spaced),
            Err(SecretError::NotAscii)
        ));
        assert!(ServiceSecret::new(SECRET).is_ok());
    }

    #[test]
    fn only_the_secret_matches() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        assert!(s.matches(SECRET.as_bytes()));
        assert!(!s.matches(b""));
        assert!(!s.matches(&SECRET.as_bytes()[..31]));
        assert!(!s.matches(format!("{SECRET}0").as_bytes()));
        assert!(!format!("{s:?}").contains(SECRET));
    }

    #[test]
    fn proofs_bind_the_nonce_and_the_secret() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        let other = ServiceSecret::new(&SECRET.replace('0', "1")).expect("secret");
        let proof = s.proof(b"nonce-1");
        assert!(s.verify_proof(b"nonce-1", &proof));
        assert!(!s.verify_proof(b"nonce-2", &proof));
        assert!(!other.verify_proof(b"nonce-1", &proof));
        assert!(!s.verify_proof(b"nonce-1", &[]));
    }
}
