//! Authentication between edge and worker: a shared secret that never
//! travels.
//!
//! Every worker process draws a random instance id when it starts. Before
//! an edge calls a worker at all, the worker proves it knows the secret:
//! the edge's health check (`Health/Ready`, the one service without a
//! signature) carries a fresh random nonce, and the worker answers with its
//! instance id and the HMAC under the secret of both; only a worker that
//! does is called.
//!
//! Every call is then signed (see [`crate::signed`]): an HMAC under the
//! secret over the call's method, the time it was made, a fresh nonce, the
//! instance id of the worker it is for and the digest of its body. A
//! worker checks the signature on the headers alone before it reads a byte
//! of the body, and takes a signature once: only for itself (not another
//! worker, nor itself once restarted), within a window of its clock, and
//! never again. So a process that reaches a worker's port without the
//! secret is refused, and one that takes over a worker's address, even one
//! that relays the edge's health check to a real worker to pass it, learns
//! nothing it could use to act as anyone.
//!
//! The MACs are kept apart by their prefixes, so no proof is ever a call's
//! signature; both prefixes name their version, so an edge never takes a
//! worker of an earlier release (which expects the secret itself) as
//! proved, nor the other way round.

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

/// The secret edges and workers share, as the HMAC keyed with it.
#[derive(Clone)]
pub struct ServiceSecret {
    mac: Hmac<Sha256>,
}

/// A worker process's id, drawn when it starts.
pub type Instance = [u8; 16];

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
        // HMAC takes keys of any length
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
        Ok(Self { mac })
    }

    /// The MAC of a worker's readiness: its instance, then the edge's nonce
    /// (the one part of no fixed length, last).
    fn ready_mac(&self, instance: &Instance, nonce: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(b"chatd worker ready v2\0");
        mac.update(instance);
        mac.update(nonce);
        mac
    }

    /// A worker's proof that it knows the secret, over its `instance` and
    /// an edge's `nonce`.
    pub fn proof(&self, instance: &Instance, nonce: &[u8]) -> Vec<u8> {
        self.ready_mac(instance, nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `proof` is the proof over `instance` and `nonce` (constant
    /// time).
    pub fn verify_proof(&self, instance: &Instance, nonce: &[u8], proof: &[u8]) -> bool {
        self.ready_mac(instance, nonce).verify_slice(proof).is_ok()
    }

    /// The MAC of one call: its path, then parts of fixed lengths (its
    /// time, its nonce, its worker, its body's digest); the path ends at a
    /// NUL (no URI path holds one), so no two calls share an input.
    fn call_mac(&self, call: &Call<'_>) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(b"chatd call v2\0");
        mac.update(call.path.as_bytes());
        mac.update(b"\0");
        mac.update(&call.at_ms.to_be_bytes());
        mac.update(&call.nonce);
        mac.update(&call.instance);
        mac.update(&call.digest);
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
    /// The worker it is for.
    pub instance: Instance,
    /// The SHA-256 of the call's HTTP body, as sent.
    pub digest: [u8; 32],
}

/// The SHA-256 of `body`.
pub fn digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
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
    fn proofs_bind_the_instance_the_nonce_and_the_secret() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        let other = ServiceSecret::new(&SECRET.replace('0', "1")).expect("secret");
        let proof = s.proof(&[1; 16], b"nonce-1");
        assert!(s.verify_proof(&[1; 16], b"nonce-1", &proof));
        assert!(!s.verify_proof(&[1; 16], b"nonce-2", &proof));
        assert!(
            !s.verify_proof(&[2; 16], b"nonce-1", &proof),
            "another worker"
        );
        assert!(!other.verify_proof(&[1; 16], b"nonce-1", &proof));
        assert!(!s.verify_proof(&[1; 16], b"nonce-1", &[]));
    }

    #[test]
    fn a_signature_binds_the_secret_and_everything_about_the_call() {
        let s = ServiceSecret::new(SECRET).expect("secret");
        let call = Call {
            path: "/chat.v1.Messages/History",
            at_ms: 1_000,
            nonce: [7; 16],
            instance: [3; 16],
            digest: digest(b"caller alice"),
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
                instance: [4; 16],
                ..call
            },
            Call {
                digest: digest(b"caller bobby"),
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
            instance: [0; 16],
            digest: digest(b""),
        };
        let tag = s.sign(&call);
        // the proof's input is its prefix, the instance, the nonce: here
        // all of the call's input after that prefix
        let mut as_nonce = b"chatd call v2\0/p\0".to_vec();
        as_nonce.extend_from_slice(&[0; 40]);
        as_nonce.extend_from_slice(&digest(b""));
        assert_ne!(s.proof(&[0; 16], &as_nonce), tag.to_vec());
    }
}
