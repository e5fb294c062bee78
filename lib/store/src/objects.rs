//! Object storage (S3-compatible) for media bytes: pre-signed URLs, and the
//! few server-side calls the worker makes (head, delete). Bytes never pass
//! through this process.

use std::{sync::Arc, time::Duration};

use http::{HeaderValue, Method, header};
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, RetryConfig,
    aws::{AmazonS3, AmazonS3Builder},
    path::Path,
    signer::Signer,
};

use crate::StoreError;

/// Where the bucket is and how to reach it.
#[derive(Debug, Clone)]
pub struct ObjectsConfig {
    pub endpoint: String,
    /// The endpoint clients reach, if not `endpoint` (a store behind a
    /// private name): pre-signed URLs are signed for it.
    pub public_endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

/// A stored object, as far as the worker checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
}

/// The media bucket.
#[derive(Clone)]
pub struct Objects {
    s3: Arc<AmazonS3>,
    /// Signs URLs for clients (the same client unless a public endpoint is
    /// configured).
    signer: Arc<AmazonS3>,
    /// Signs uploads, with their size (`presign.rs`).
    uploads: Arc<crate::presign::PutSigner>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never print credentials
        f.debug_struct("Objects").finish_non_exhaustive()
    }
}

/// How long the worker's own calls (head, delete) may take, retries
/// included. The library's defaults retry for up to three minutes; a client
/// waiting on a send hears `unavailable` well within the edge's RPC deadline
/// instead (measured: a send with the store down took 3 to over 10 s).
fn patience() -> (RetryConfig, ClientOptions) {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(3),
    };
    let options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    (retry, options)
}

fn object_error(e: object_store::Error) -> StoreError {
    StoreError::Unavailable(format!("object store: {e}"))
}

impl Objects {
    /// Builds the client; no request is made until it is used.
    pub fn new(c: &ObjectsConfig) -> Result<Self, StoreError> {
        // object_store builds its reqwest client itself
        chat_http::install_tls();
        let build = |endpoint: &str| {
            let (retry, options) = patience();
            AmazonS3Builder::new()
                .with_retry(retry)
                .with_client_options(options)
                .with_endpoint(endpoint)
                .with_bucket_name(&c.bucket)
                .with_region(&c.region)
                .with_access_key_id(&c.access_key)
                .with_secret_access_key(&c.secret_key)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false)
                .build()
                .map(Arc::new)
                .map_err(|e| StoreError::Database(format!("object store configuration: {e}")))
        };
        let s3 = build(&c.endpoint)?;
        let signer = match &c.public_endpoint {
            Some(public) => build(public)?,
            None => s3.clone(),
        };
        let uploads =
            crate::presign::PutSigner::new(c.public_endpoint.as_deref().unwrap_or(&c.endpoint), c)?;
        Ok(Self {
            s3,
            signer,
            uploads: Arc::new(uploads),
        })
    }

    /// A URL for one PUT of exactly `size` bytes of `mime` to `key`, valid
    /// for `ttl`. Both the content type and the length are part of the
    /// signature: the store refuses an upload of another type or size, so
    /// a ticket for a small file cannot carry gigabytes. (`object_store`'s
    /// signer leaves `content-length` out, hence a signer of our own.) The
    /// worker still checks the stored size before a message may use the
    /// object. Returns the URL and the headers the client must send (its
    /// HTTP library sets `Content-Length` from the body).
    pub fn sign_put(
        &self,
        key: &str,
        mime: &str,
        size: u64,
        ttl: Duration,
    ) -> Result<(String, Vec<(String, String)>), StoreError> {
        HeaderValue::from_str(mime).map_err(|e| StoreError::Database(e.to_string()))?;
        let url = self
            .uploads
            .sign(key, mime, size, ttl, std::time::SystemTime::now());
        Ok((
            url,
            vec![(header::CONTENT_TYPE.as_str().to_owned(), mime.to_owned())],
        ))
    }

    /// A URL for GETs of `key`, valid for `ttl`.
    pub async fn sign_get(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        let url = self
            .signer
            .signed_url(Method::GET, &Path::from(key), ttl)
            .await
            .map_err(object_error)?;
        Ok(url.to_string())
    }

    /// The object's size and type, or `None` if there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.s3.get_opts(&Path::from(key), options).await {
            Ok(r) => Ok(Some(ObjectInfo {
                size: r.meta.size,
                content_type: r
                    .attributes
                    .get(&object_store::Attribute::ContentType)
                    .map(|v| v.to_string()),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Copies the object `from` to `to` inside the bucket (the store does
    /// the work: the bytes never pass through the worker).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        self.s3
            .copy(&Path::from(from), &Path::from(to))
            .await
            .map_err(object_error)
    }

    /// Deletes `key`; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.s3.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error(e)),
        }
    }
}
