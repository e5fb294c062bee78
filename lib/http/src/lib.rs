//! The one way the workspace builds an HTTP client.
//!
//! reqwest is built with rustls but without a crypto provider of its own
//! (`rustls-no-provider` in the workspace's `Cargo.toml`): its default
//! provider is aws-lc-rs, a second crypto library beside the ring that NATS
//! and MongoDB already use, and a C build of about 25 s on a fresh machine.
//! Without a provider installed, building a client panics, so every client
//! comes from [`builder`] (or [`client`]), which installs ring's first;
//! `clippy.toml` refuses reqwest's own constructors everywhere else. Code
//! that lets a library build the client (the S3 client of `object_store`)
//! calls [`install_tls`] before it.

#![allow(clippy::disallowed_methods)] // the one place allowed

/// Installs ring as the process's rustls crypto provider, unless one is
/// installed already. Cheap and idempotent.
pub fn install_tls() {
    // Err: a provider is installed already, which is all that matters
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client builder, the crypto provider installed.
pub fn builder() -> reqwest::ClientBuilder {
    install_tls();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults.
pub fn client() -> reqwest::Client {
    install_tls();
    reqwest::Client::new()
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_a_client_that_speaks_tls() {
        let client = super::builder().https_only(true).build();
        assert!(client.is_ok(), "{client:?}");
        // a provider is installed for the whole process
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
