//! Authentication between edge and worker: a shared secret that never
//! travels.
//!
//! Every call from an edge is signed: an HMAC-SHA256 under the secret over
//! the call's method, the time it was made, a fresh random nonce and the
//! digest of its body (see [`crate::signed`]), which the worker checks before
//! anything else. A signature is good for one call only: it names its body,
//! and a worker refuses it again or once it is older than the window. So a
//! process that reaches a worker's port without the secret is refused, and
//! one that takes over a worker's address, even one that relays the edge's
//! health check to a real worker to pass it, learns nothing it could use to
//! act as anyone.
//!
//! Before an edge calls a worker at all, the worker proves it knows the
//! secret: the edge's health check (`Health/Ready`, the one service without a
//! signature) carries a fresh random nonce, and only a worker that answers
//! with the nonce's HMAC under the secret is called. The two MACs are kept
//! apart by their prefixes, so no proof is ever a call's signature.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

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
        })
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

    /// The MAC of one call: its path, its time, its nonce and its body's
    /// digest, each of a fixed length but the path, which ends at a NUL (no
    /// URI path holds one), so no two calls share an input.
    fn call_mac(&self, call: &Call<'_>) -> Hmac<Sha256> {
        let mut mac = self.mac();
        mac.update(b"chatd call v1\0");
        mac.update(call.path.as_bytes());
        mac.update(b"\0");
        mac.update(&call.at_ms.to_be_bytes());
        mac.update(&call.nonce);
        mac.update(&Sha256::digest(call.body));
        mac
    }

    /// The signature of `call`.
    pub fn sign(&self, call: &Call<'_>) -> [u8; 32] {
        self.call_mac(call).finalize().into_bytes().into()
    }

    /// Whether `tag` is the signature of `call` (constant time).
    pub fn verify(&self, call: &Call<'_>, tag: &[u8]) -> bool {
        self.call_mac(call).verify_slice(tag).is_ok()
    }
}

/// What a call's signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The gRPC method's path (`/chat.v1.Messages/Send`).
    pub path: &'a str,
    /// When the edge made the call, in milliseconds since the epoch.
    pub at_ms: u64,
    /// Fresh for every call.
    pub nonce: [u8; 16],
    /// The call's HTTP body, as sent.
    pub body: &'a [u8],
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
    fn the_secret_is_never_printed() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        assert!(!format!("{s:?}").contains(SECRET));
    }

    #[test]
    fn a_signature_binds_the_secret_and_everything_about_the_call() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        let call = Call {
            path: "/chat.v1.Messages/History",
            at_ms: 1_000,
            nonce: [7; 16],
            body: b"caller alice",
        };
        let tag = s.sign(&call);
        assert!(s.verify(&call, &tag));
        let other = ServiceSecret::new(&SECRET.replace('0', "1")).expect("secret");
        assert!(!other.verify(&call, &tag), "another secret");
        for changed in [
            Call {
                path: "/chat.v1.Messages/Send",
                ..call
            },
            Call {
                at_ms: 1_001,
                ..call
            },
            Call {
                nonce: [8; 16],
                ..call
            },
            Call {
                body: b"caller bobby",
                ..call
            },
        ] {
            assert!(!s.verify(&changed, &tag), "{changed:?}");
        }
        assert!(!s.verify(&call, &tag[..31]));
    }

    #[test]
    fn no_proof_of_readiness_is_a_call_s_signature() {
        // the health check signs any nonce it is sent: the prefixes keep
        // what it signs apart from every call
        let s = ServiceSecret::new(SECRET).expect("secret");
        let call = Call {
            path: "/p",
            at_ms: 0,
            nonce: [0; 16],
            body: b"",
        };
        let tag = s.sign(&call);
        let mut as_nonce = b"chatd call v1\0/p\0".to_vec();
        as_nonce.extend_from_slice(&[0; 24]);
        as_nonce.extend_from_slice(&Sha256::digest(b""));
        assert_ne!(s.proof(&as_nonce), tag.to_vec());
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
