//! TLS between the roles. A worker serves gRPC over TLS with its
//! certificate ([`ServerTls`]) and may require edges to present one of
//! theirs, signed by a CA it names; an edge verifies every worker against
//! the CA it is given ([`ClientTls`]) and presents its own certificate if it
//! has one.
//!
//! TLS keeps calls and answers from anyone on the path and lets an edge
//! tell a worker from an impostor at its address. It does not replace the
//! service secret: a worker still takes only calls signed with it
//! ([`crate::Signed`]), so a certificate alone, even one from the right
//! CA, cannot act as any user.
//!
//! Files are read and checked once, at start-up, with what the connections
//! will check them with (every CA certificate a trust anchor, the key the
//! certificate's and one rustls signs with, the name one a certificate
//! can hold), so that a bad one stops the process with a message naming
//! the file, not the first call.

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// What is wrong with a TLS file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("the certificate and key are not usable together: {0}")]
    Unusable(String),
    #[error("{0:?} is not a host name or address a certificate can be checked against")]
    BadName(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of `path`, every one of them well-formed.
fn certificates(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok((pem, certs))
}

/// The PEM of `path`, checked to hold CA certificates that can all be
/// trusted as roots (a certificate rustls cannot take would otherwise be
/// dropped without a word, leaving nothing to verify against).
pub fn ca_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let (pem, certs) = certificates(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::Bad {
            path: path.to_owned(),
            reason: format!("not a CA certificate rustls can trust: {e}"),
        })?;
    }
    Ok(pem)
}

/// The PEM of `cert` (a chain, its own certificate first) and of `key`,
/// checked to be a key rustls can sign with and the one the certificate is
/// for.
pub fn identity_pem(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    chat_http::install_tls();
    let (cert_pem, chain) = certificates(cert)?;
    let key_pem = read(key)?;
    let private = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key.to_owned(),
            });
        }
        Err(e) => {
            return Err(TlsError::Bad {
                path: key.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    // the process's provider, as the connections will use it
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::ring::default_provider()));
    rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        TlsError::Unusable(format!("{} and {}: {e}", cert.display(), key.display()))
    })?;
    Ok((cert_pem, key_pem))
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let (cert, key) = identity_pem(cert, key)?;
    Ok(Identity::from_pem(cert, key))
}

/// A worker's side: its certificate chain and key, and the CA whose
/// certificates edges must present, if it asks for one.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: ServerTlsConfig,
}

impl ServerTls {
    /// From PEM files: `cert` (the chain, the worker's own first), `key`,
    /// and `client_ca` if edges must present a certificate it signed.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        chat_http::install_tls();
        let mut config = ServerTlsConfig::new().identity(identity(cert, key)?);
        if let Some(ca) = client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca_pem(ca)?));
        }
        Ok(Self { config })
    }

    /// The configuration for `tonic::transport::Server::tls_config`.
    pub fn config(&self) -> ServerTlsConfig {
        self.config.clone()
    }
}

/// An edge's side: the CA that signs workers' certificates, the edge's own
/// certificate if workers ask for one, and the name to check workers'
/// certificates against if not each URL's host.
#[derive(Clone, Debug)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
    name: Option<String>,
}

impl ClientTls {
    /// From PEM files: `ca`, and `identity` (certificate chain, key) if the
    /// edge presents one. `name`, if given, is what every worker's
    /// certificate must be for, in place of the host of its URL.
    pub fn from_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        name: Option<String>,
    ) -> Result<Self, TlsError> {
        chat_http::install_tls();
        if let Some(name) = &name {
            ServerName::try_from(name.as_str()).map_err(|_| TlsError::BadName(name.clone()))?;
        }
        Ok(Self {
            ca: Certificate::from_pem(ca_pem(ca)?),
            identity: identity
                .map(|(cert, key)| self::identity(cert, key))
                .transpose()?,
            name,
        })
    }

    /// The configuration for a channel to a worker: its certificate is
    /// checked against the CA, and against the given name if there is one,
    /// else `host` (a looked-up address takes the name it was looked up
    /// by), else the URL's own host.
    pub fn config(&self, host: Option<&str>) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        if let Some(name) = self.name.as_deref().or(host) {
            config = config.domain_name(name);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("temp dir"),
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    fn pki() -> (String, String, String) {
        let mut params =
            rcgen::CertificateParams::new(vec!["worker.test".to_owned()]).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem(), cert.pem())
    }

    #[test]
    fn good_files_make_both_sides() {
        let f = Files::new();
        let (cert, key, ca) = pki();
        let (cert, key, ca) = (
            f.write("cert.pem", &cert),
            f.write("key.pem", &key),
            f.write("ca.pem", &ca),
        );
        assert!(ServerTls::from_files(&cert, &key, Some(&ca)).is_ok());
        assert!(
            ClientTls::from_files(&ca, Some((&cert, &key)), Some("worker.test".into())).is_ok()
        );
        assert!(ClientTls::from_files(&ca, None, None).is_ok());
    }

    #[test]
    fn each_bad_file_is_named_in_its_error() {
        let f = Files::new();
        let (cert, key, _) = pki();
        let (cert, key) = (f.write("cert.pem", &cert), f.write("key.pem", &key));
        let empty = f.write("empty.pem", "nothing here\n");
        let broken = f.write(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        let missing = f.dir.path().join("missing.pem");

        let e = ServerTls::from_files(&missing, &key, None).expect_err("missing");
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = ServerTls::from_files(&empty, &key, None).expect_err("no cert");
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = ServerTls::from_files(&broken, &key, None).expect_err("broken");
        assert!(matches!(e, TlsError::Bad { .. }), "{e}");
        // a certificate is not a key
        let e = ServerTls::from_files(&cert, &cert, None).expect_err("no key");
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        let e = ServerTls::from_files(&cert, &key, Some(&empty)).expect_err("no client CA");
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = ClientTls::from_files(&empty, None, None).expect_err("no CA");
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = ClientTls::from_files(&cert, Some((&cert, &empty)), None).expect_err("no key");
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    }

    #[test]
    fn a_key_that_is_not_the_certificate_s_is_refused_at_start() {
        let f = Files::new();
        let (cert, _, _) = pki();
        let (_, other_key, _) = pki();
        let (cert, other_key) = (f.write("cert.pem", &cert), f.write("key.pem", &other_key));
        let e = ServerTls::from_files(&cert, &other_key, None).expect_err("mismatched");
        assert!(matches!(e, TlsError::Unusable(_)), "{e}");
        // the edge's own certificate too, named as such even with a name
        let ca = f.write("ca.pem", &pki().2);
        let e = ClientTls::from_files(&ca, Some((&cert, &other_key)), Some("w.test".into()))
            .expect_err("mismatched");
        assert!(matches!(e, TlsError::Unusable(_)), "{e}");
        assert!(e.to_string().contains("key.pem"), "{e}");
    }

    /// A CA file whose certificate is framed right but cannot be parsed
    /// would leave nothing to verify against: refused at start.
    #[test]
    fn a_ca_that_cannot_be_trusted_is_refused_at_start() {
        let f = Files::new();
        let (cert, key, _) = pki();
        let (cert, key) = (f.write("cert.pem", &cert), f.write("key.pem", &key));
        let junk = f.write(
            "junk-ca.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = ClientTls::from_files(&junk, None, None).expect_err("junk CA");
        assert!(matches!(e, TlsError::Bad { .. }), "{e}");
        assert!(e.to_string().contains("junk-ca.pem"), "{e}");
        let e = ServerTls::from_files(&cert, &key, Some(&junk)).expect_err("junk client CA");
        assert!(e.to_string().contains("junk-ca.pem"), "{e}");
        assert!(ca_pem(&junk).is_err());
    }

    #[test]
    fn a_name_no_certificate_can_hold_is_refused() {
        let f = Files::new();
        let (_, _, ca) = pki();
        let ca = f.write("ca.pem", &ca);
        let e = ClientTls::from_files(&ca, None, Some("not a name".into())).expect_err("name");
        assert!(matches!(e, TlsError::BadName(_)), "{e}");
    }
}
