//! JWT verification to a user identity (DESIGN.md, "Auth"), and minting of
//! HS256 tokens for local use and tests.
//!
//! `sub` is the user id, `exp` is required, and only the algorithm family of
//! the configured key is accepted: an HS256 secret never verifies an RS256
//! token and vice versa, and `alg: none` is never accepted. `nbf` is
//! honoured; an issuer, an audience and a longest lifetime can be required
//! ([`TokenPolicy`]); the clock leeway is configurable.

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
    #[error("every accepted key must use the same algorithm")]
    Mixed,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    /// The optional `name` claim, kept in the user's profile.
    pub name: Option<String>,
    /// When the token stops being valid (`exp`, seconds since the epoch):
    /// what it opened ends then too.
    pub expires_at: u64,
}

impl Identity {
    /// How long the token is still valid: `None` once its `exp` has
    /// passed (what a leeway for clock skew still lets through counts as
    /// passed).
    pub fn time_left(&self) -> Option<std::time::Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        std::time::Duration::from_secs(self.expires_at)
            .checked_sub(now)
            .filter(|left| !left.is_zero())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// What a token must satisfy beyond its signature, `exp` and `sub`.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    /// `iss` must be this.
    pub issuer: Option<String>,
    /// `aud` must contain this. Without it, a token's `aud` is not checked
    /// (it is the issuer's business which audiences it names).
    pub audience: Option<String>,
    /// The longest a token may be valid: `exp` minus `iat` (or minus now,
    /// for a token without `iat`).
    pub max_lifetime_secs: Option<u64>,
    /// Clock skew allowed on `exp`, `nbf` and the lifetime.
    pub leeway_secs: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            max_lifetime_secs: None,
            leeway_secs: 30,
        }
    }
}

/// Verifies tokens against the configured keys: the current one first, then
/// any others accepted while keys rotate (a token is accepted if one of them
/// verifies its signature; the first that does decides the rest).
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
    max_lifetime_secs: Option<u64>,
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
        validation.validate_nbf = true;
        // checked only when an audience is configured (TokenPolicy)
        validation.validate_aud = false;
        validation.leeway = TokenPolicy::default().leeway_secs;
        Self {
            keys: vec![key],
            validation,
            max_lifetime_secs: None,
        }
    }

    /// Also accepts tokens signed with `other`'s keys (key rotation); both
    /// must use the same algorithm.
    pub fn also(mut self, other: Verifier) -> Result<Self, KeyError> {
        if other.validation.algorithms != self.validation.algorithms {
            return Err(KeyError::Mixed);
        }
        self.keys.extend(other.keys);
        Ok(self)
    }

    /// Applies `policy` on top of the key's checks.
    pub fn with_policy(mut self, policy: &TokenPolicy) -> Self {
        let v = &mut self.validation;
        v.leeway = policy.leeway_secs;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &policy.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &policy.audience {
            v.set_audience(&[aud]);
            v.validate_aud = true;
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        self.max_lifetime_secs = policy.max_lifetime_secs;
        self
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
        // the first key whose signature matches decides; a bad signature
        // under one key tries the next
        let mut decoded = Err(jsonwebtoken::errors::ErrorKind::InvalidSignature.into());
        for key in &self.keys {
            decoded = jsonwebtoken::decode::<Claims>(token, key, &self.validation);
            if !matches!(&decoded, Err(e) if *e.kind() == ErrorKind::InvalidSignature) {
                break;
            }
        }
        let data = decoded.map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
            ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
            ErrorKind::MissingRequiredClaim(c) => AuthError::Invalid(format!("missing claim {c}")),
            ErrorKind::ImmatureSignature => AuthError::Invalid("token not valid yet".into()),
            ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
            ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
            _ => AuthError::Invalid("malformed token".into()),
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        if data
            .claims
            .iat
            .is_some_and(|iat| iat > now + self.validation.leeway)
        {
            return Err(AuthError::Invalid("token issued in the future".into()));
        }
        if let Some(max) = self.max_lifetime_secs {
            // from when it was issued, or from now if that is earlier: a
            // token is never usable for longer than `max` from here
            let from = data.claims.iat.map_or(now, |iat| iat.min(now));
            if data.claims.exp.saturating_sub(from) > max + self.validation.leeway {
                return Err(AuthError::Invalid(format!(
                    "token lifetime is longer than {max} seconds"
                )));
            }
        }
        let user_id = UserId::parse_new(data.claims.sub)
            .map_err(|e| AuthError::Invalid(format!("bad sub claim: {e}")))?;
        let name = data
            .claims
            .name
            .map(|n| {
                chat_domain::text::strip_for_name(&n)
                    .chars()
                    .take(128)
                    .collect::<String>()
            })
            .filter(|n| !n.trim().is_empty());
        Ok(Identity {
            user_id,
            name,
            expires_at: data.claims.exp,
        })
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
        iat: Some(now.max(0) as u64),
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
    fn during_a_rotation_tokens_of_every_accepted_key_pass_and_no_others() {
        const NEW: &[u8] = b"new-secret-new-secret-new-secret";
        const GONE: &[u8] = b"gone-secret-gone-secret-gone-sec";
        let v = Verifier::hs256(NEW)
            .and_then(|v| v.also(Verifier::hs256(SECRET)?))
            .expect("keys");
        for key in [NEW, SECRET] {
            let t = mint_hs256(key, &uid("alice"), None, 60).expect("mint");
            assert_eq!(v.verify(&t).expect("accepted").user_id, uid("alice"));
        }
        let t = mint_hs256(GONE, &uid("alice"), None, 60).expect("mint");
        assert!(matches!(v.verify(&t), Err(AuthError::Invalid(_))));
        // an old key's expired token is expired, not a bad signature
        let t = mint_hs256(SECRET, &uid("alice"), None, -3600).expect("mint");
        assert!(matches!(v.verify(&t), Err(AuthError::Expired)));
        // keys of two algorithms cannot be mixed
        let ed25519 = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAp4FBRR4rLfExB22hCxwyAs/XMwmn+Rh//d+THtkcXFM=\n-----END PUBLIC KEY-----\n";
        let eddsa = Verifier::public_key("EdDSA", ed25519).expect("public key");
        assert!(matches!(
            Verifier::hs256(NEW).expect("key").also(eddsa),
            Err(KeyError::Mixed)
        ));
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
            iat: None,
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

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode")
    }

    #[test]
    fn nbf_issuer_audience_and_lifetime_are_checked() {
        let now = jsonwebtoken::get_current_timestamp();
        let plain = Verifier::hs256(SECRET).expect("key");
        // not valid for another hour
        let early = sign(serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": now + 3600}));
        assert!(
            matches!(plain.verify(&early), Err(AuthError::Invalid(m)) if m.contains("not valid yet"))
        );
        // an audience is fine when none is required
        let aud = sign(serde_json::json!({"sub": "a", "exp": now + 60, "aud": "chat"}));
        assert!(plain.verify(&aud).is_ok());

        let strict = Verifier::hs256(SECRET)
            .expect("key")
            .with_policy(&TokenPolicy {
                issuer: Some("https://id.example".into()),
                audience: Some("chat".into()),
                max_lifetime_secs: Some(3600),
                leeway_secs: 5,
            });
        let good = serde_json::json!({"sub": "a", "exp": now + 600, "iat": now,
            "iss": "https://id.example", "aud": ["chat", "other"]});
        assert!(strict.verify(&sign(good.clone())).is_ok());
        let with = |key: &str, value: serde_json::Value| {
            let mut c = good.clone();
            c[key] = value;
            sign(c)
        };
        let without = |key: &str| {
            let mut c = good.clone();
            c.as_object_mut().expect("object").remove(key);
            sign(c)
        };
        for (why, token) in [
            ("wrong issuer", with("iss", "https://evil.example".into())),
            ("no issuer", without("iss")),
            ("wrong audience", with("aud", "other".into())),
            ("no audience", without("aud")),
            ("lifetime", with("exp", (now + 7200).into())),
            ("lifetime without iat", {
                let mut c = good.clone();
                c["exp"] = (now + 7200).into();
                c.as_object_mut().expect("object").remove("iat");
                sign(c)
            }),
            // an hour's lifetime, issued in a year: usable for a year
            ("issued in the future", {
                let mut c = good.clone();
                c["iat"] = (now + 365 * 86_400).into();
                c["exp"] = (now + 365 * 86_400 + 600).into();
                sign(c)
            }),
        ] {
            assert!(strict.verify(&token).is_err(), "{why} accepted");
        }
        // the leeway is what was configured: 10 s past exp is too late at 5 s
        let late = with("exp", (now - 10).into());
        assert!(matches!(strict.verify(&late), Err(AuthError::Expired)));
        // a token from the future is refused with no lifetime required too;
        // one a few seconds ahead (clock skew) is not
        let future = sign(serde_json::json!({"sub": "a", "exp": now + 7200, "iat": now + 3600}));
        assert!(
            matches!(plain.verify(&future), Err(AuthError::Invalid(m)) if m.contains("future"))
        );
        let skewed = sign(serde_json::json!({"sub": "a", "exp": now + 600, "iat": now + 2}));
        assert!(plain.verify(&skewed).is_ok());
        assert!(strict.verify(&with("iat", (now + 2).into())).is_ok());
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
