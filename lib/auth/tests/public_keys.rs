//! RS256, ES256 and EdDSA tokens verify against their public keys, and only
//! against the configured algorithm (test keys made with openssl, test use
//! only).

use chat_auth::Verifier;
use chat_domain::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const RSA_KEY: &[u8] = include_bytes!("keys/rsa.key");
const RSA_PUB: &[u8] = include_bytes!("keys/rsa.pub");
const EC_KEY: &[u8] = include_bytes!("keys/ec.key");
const EC_PUB: &[u8] = include_bytes!("keys/ec.pub");
const ED_KEY: &[u8] = include_bytes!("keys/ed.key");
const ED_PUB: &[u8] = include_bytes!("keys/ed.pub");

fn claims(exp_offset: i64) -> serde_json::Value {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    serde_json::json!({ "sub": "alice", "exp": now + exp_offset })
}

fn sign(alg: Algorithm, key: &EncodingKey, exp_offset: i64) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims(exp_offset), key).expect("sign")
}

#[test]
fn each_public_key_algorithm_verifies_its_own_tokens_only() {
    let cases = [
        (
            "RS256",
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa key"),
            RSA_PUB,
        ),
        (
            "ES256",
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY).expect("ec key"),
            EC_PUB,
        ),
        (
            "EdDSA",
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_KEY).expect("ed key"),
            ED_PUB,
        ),
    ];
    for (name, alg, key, public) in &cases {
        let v = Verifier::public_key(name, public).expect("public key loads");
        let id = v.verify(&sign(*alg, key, 60)).expect("valid token");
        assert_eq!(id.user_id, UserId::parse("alice").expect("id"));
        assert!(
            v.verify(&sign(*alg, key, -3600)).is_err(),
            "{name}: expired accepted"
        );
        // tokens of the other algorithms are refused
        for (other, other_alg, other_key, _) in &cases {
            if other != name {
                assert!(
                    v.verify(&sign(*other_alg, other_key, 60)).is_err(),
                    "{name} accepted {other}"
                );
            }
        }
        // key confusion: an HS256 token keyed with the public key is refused
        let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(public), 60);
        assert!(
            v.verify(&confused).is_err(),
            "{name}: HS256 with the public key accepted"
        );
    }
}

#[test]
fn a_public_key_of_the_wrong_kind_is_refused_at_start() {
    assert!(Verifier::public_key("RS256", EC_PUB).is_err());
    assert!(Verifier::public_key("ES256", b"not a pem").is_err());
}
