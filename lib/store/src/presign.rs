//! Pre-signed S3 uploads that bind their length: AWS Signature Version 4
//! in the query string, with `content-length`, `content-type` and `host`
//! as signed headers and an unsigned payload. A client that sends another
//! length (or type) gets `403` from the store, before a byte is kept.
//! Path-style URLs (`<endpoint>/<bucket>/<key>`), as the rest of the bucket
//! client uses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{StoreError, objects::ObjectsConfig};

/// Signs PUT URLs for one bucket at one endpoint.
pub(crate) struct PutSigner {
    /// `scheme://authority`, as clients reach the store.
    base: String,
    /// What clients send as `Host` (the authority without a default port).
    host: String,
    bucket: String,
    region: String,
    access_key: String,
    secret_key: String,
}

/// S3 caps a pre-signed URL at seven days.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl PutSigner {
    pub(crate) fn new(endpoint: &str, c: &ObjectsConfig) -> Result<Self, StoreError> {
        let bad =
            |why: &str| StoreError::Database(format!("object store endpoint {endpoint}: {why}"));
        let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme"))?.to_owned();
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad("not http or https")),
        };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_owned(),
        };
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("a path after the host is not supported"));
        }
        Ok(Self {
            base: format!("{scheme}://{host}"),
            host,
            bucket: c.bucket.clone(),
            region: c.region.clone(),
            access_key: c.access_key.clone(),
            secret_key: c.secret_key.clone(),
        })
    }

    /// The URL for one PUT of `size` bytes of `mime` to `key`, valid for
    /// `ttl` from `now`.
    pub(crate) fn sign(
        &self,
        key: &str,
        mime: &str,
        size: u64,
        ttl: Duration,
        now: SystemTime,
    ) -> String {
        let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let (date, stamp) = utc(secs);
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let path = format!("/{}/{}", encode(&self.bucket, false), encode(key, true));
        let signed_headers = "content-length;content-type;host";
        // in the order of their names, encoded
        let query = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_owned()),
            ("X-Amz-Credential", format!("{}/{scope}", self.access_key)),
            ("X-Amz-Date", stamp.clone()),
            (
                "X-Amz-Expires",
                ttl.min(MAX_TTL).as_secs().max(1).to_string(),
            ),
            ("X-Amz-SignedHeaders", signed_headers.to_owned()),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v, false)))
        .collect::<Vec<_>>()
        .join("&");
        let canonical = format!(
            "PUT\n{path}\n{query}\ncontent-length:{size}\ncontent-type:{}\nhost:{}\n\n{signed_headers}\nUNSIGNED-PAYLOAD",
            mime.trim(),
            self.host
        );
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
        format!("{}{path}?{query}&X-Amz-Signature={signature}", self.base)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // any key length is accepted
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// SigV4's URI encoding: every byte but `A-Za-z0-9-_.~` as `%XX`
/// (upper-case), and `/` too unless `keep_slash`.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `(YYYYMMDD, YYYYMMDDTHHMMSSZ)` of `secs` since the epoch, in UTC.
fn utc(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // days to a civil date (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    let stamp = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    );
    (date, stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc(0), ("19700101".into(), "19700101T000000Z".into()));
        // 2024-02-29 23:59:59, a leap day
        assert_eq!(
            utc(1_709_251_199),
            ("20240229".into(), "20240229T235959Z".into())
        );
        assert_eq!(
            utc(1_764_670_530),
            ("20251202".into(), "20251202T101530Z".into())
        );
    }

    /// The URL's shape and encoding, and the type and length bound into
    /// its signature. (Whether a store accepts it, and refuses another
    /// length, the media tests check against a real S3 server.)
    #[test]
    fn urls_are_path_style_and_bind_type_and_length() {
        let c = ObjectsConfig {
            endpoint: "http://127.0.0.1:9000".into(),
            public_endpoint: None,
            bucket: "media".into(),
            region: "us-east-1".into(),
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        };
        let signer = PutSigner::new(&c.endpoint, &c).expect("signer");
        let at = UNIX_EPOCH + Duration::from_secs(1_764_670_530);
        let ttl = Duration::from_secs(900);
        let url = signer.sign("groups/g/abc", "image/png", 1_024, ttl, at);
        assert!(
            url.starts_with(
                "http://127.0.0.1:9000/media/groups/g/abc?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKIDEXAMPLE%2F20251202%2Fus-east-1%2Fs3%2Faws4_request\
                 &X-Amz-Date=20251202T101530Z&X-Amz-Expires=900\
                 &X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost&X-Amz-Signature="
            ),
            "{url}"
        );
        let signature = |url: &str| url.rsplit_once('=').map(|(_, s)| s.to_owned());
        assert_eq!(signature(&url).map(|s| s.len()), Some(64));
        let other_size = signer.sign("groups/g/abc", "image/png", 1_025, ttl, at);
        let other_type = signer.sign("groups/g/abc", "image/gif", 1_024, ttl, at);
        assert_ne!(signature(&url), signature(&other_size));
        assert_ne!(signature(&url), signature(&other_type));
        assert_eq!(
            url,
            signer.sign("groups/g/abc", "image/png", 1_024, ttl, at),
            "deterministic"
        );
        // default ports are left out of the host, as clients send it
        let https = PutSigner::new("https://s3.example:443", &c).expect("signer");
        assert_eq!(https.host, "s3.example");
        assert!(PutSigner::new("s3.example", &c).is_err());
        assert_eq!(encode("a b/ü", true), "a%20b/%C3%BC");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }
}
