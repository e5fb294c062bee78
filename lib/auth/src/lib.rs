//! JWT verification to a user identity (DESIGN.md, "Auth"), and minting of
//! HS256 tokens for local use and tests.
//!
//! `sub` is the user id, `exp` is required, and only the algorithm family of
//! the configured key is accepted: an HS256 secret never verifies an RS256
//! token and vice versa, and `alg: none` is never accepted.

use chat_domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The longest token accepted, in bytes: bounds the work an unauthenticated
/// caller can ask for.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a token was refused. The message is safe to show the caller.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unsupported algorithm {0}: use HS256, RS256, ES256 or EdDSA")]
    Algorithm(String),
    #[error("bad {alg} public key: {source}")]
    Pem {
        alg: &'static str,
        source: jsonwebtoken::errors::Error,
    },
    #[error("the HS256 secret must be at least 32 bytes")]
    ShortSecret,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    /// The optional `name` claim, kept in the user's profile.
    pub name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// Verifies tokens against one configured key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never print key material
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    fn with(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 30;
        Self { key, validation }
    }

    /// HS256 with a shared secret (at least 32 bytes).
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::ShortSecret);
        }
        Ok(Self::with(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// RS256, ES256 or EdDSA with a PEM public key.
    pub fn public_key(algorithm: &str, pem: &[u8]) -> Result<Self, KeyError> {
        let (alg, key) = match algorithm {
            "RS256" => (Algorithm::RS256, DecodingKey::from_rsa_pem(pem)),
            "ES256" => (Algorithm::ES256, DecodingKey::from_ec_pem(pem)),
            "EdDSA" => (Algorithm::EdDSA, DecodingKey::from_ed_pem(pem)),
            other => return Err(KeyError::Algorithm(other.to_owned())),
        };
        let key = key.map_err(|source| KeyError::Pem {
            alg: match alg {
                Algorithm::RS256 => "RS256",
                Algorithm::ES256 => "ES256",
                _ => "EdDSA",
            },
            source,
        })?;
        Ok(Self::with(key, alg))
    }

    /// Verifies `token` and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLong);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim {c}"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            },
        )?;
        let user_id = UserId::parse(data.claims.sub)
            .map_err(|e| AuthError::Invalid(format!("bad sub claim: {e}")))?;
        let name = data
            .claims
            .name
            .map(|n| n.chars().take(128).collect::<String>());
        Ok(Identity { user_id, name })
    }
}

/// Mints an HS256 token for `user` valid for `ttl_secs` (local use and tests).
pub fn mint_hs256(
    secret: &[u8],
    user: &UserId,
    name: Option<&str>,
    ttl_secs: i64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = Claims {
        sub: user.to_string(),
        exp: (now + ttl_secs).max(0) as u64,
        name: name.map(str::to_owned),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    #[test]
    fn accepts_a_valid_token() {
        let v = Verifier::hs256(SECRET).expect("key");
        let t = mint_hs256(SECRET, &uid("alice"), Some("Alice"), 60).expect("mint");
        let id = v.verify(&t).expect("valid");
        assert_eq!(id.user_id, uid("alice"));
        assert_eq!(id.name.as_deref(), Some("Alice"));
    }

    #[test]
    fn refuses_expired_wrong_key_none_and_malformed() {
        let v = Verifier::hs256(SECRET).expect("key");
        let expired = mint_hs256(SECRET, &uid("a"), None, -3600).expect("mint");
        assert!(matches!(v.verify(&expired), Err(AuthError::Expired)));
        let other =
            mint_hs256(b"another-secret-another-secret-xx", &uid("a"), None, 60).expect("mint");
        assert!(matches!(v.verify(&other), Err(AuthError::Invalid(_))));
        // alg none: header {"alg":"none"}, claims, empty signature
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(v.verify(none).is_err());
        assert!(v.verify("not.a.token").is_err());
        assert!(matches!(v.verify(""), Err(AuthError::Missing)));
        assert!(matches!(
            v.verify(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(AuthError::TooLong)
        ));
    }

    #[test]
    fn refuses_tokens_without_exp_or_with_unsafe_sub() {
        let v = Verifier::hs256(SECRET).expect("key");
        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "a".into() },
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode");
        assert!(matches!(v.verify(&t), Err(AuthError::Invalid(_))));
        let claims = Claims {
            sub: "a.b".into(),
            exp: u64::MAX / 2,
            name: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode");
        assert!(matches!(v.verify(&t), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn short_secrets_and_unknown_algorithms_are_refused() {
        assert!(matches!(
            Verifier::hs256(b"short"),
            Err(KeyError::ShortSecret)
        ));
        assert!(matches!(
            Verifier::public_key("HS512", b""),
            Err(KeyError::Algorithm(_))
        ));
    }
}
