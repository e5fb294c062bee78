//! `s3s-fs`, an S3 server that checks SigV4 signatures, on a free port with
//! a temporary folder, behind a CORS front ([`CorsFront`]) so that browsers
//! can use its pre-signed URLs.
//!
//! It is the `s3s-fs` crate's own server (its `FileSystem` storage behind the
//! `s3s` service with one access key, as its binary does) run on this
//! process's runtime rather than as a process of its own: built with the
//! workspace, it shares the workspace's dependencies, where installing its
//! binary compiled them all a second time (about 2 minutes of a fresh
//! machine's first `scripts/test`). Requests still cross a real TCP socket
//! and HTTP, and [`S3::kill`] stops it as abruptly as a killed process: the
//! listener closes and every open connection is dropped.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::anyhow;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use s3s::{auth::SimpleAuth, service::S3ServiceBuilder};
use tempfile::TempDir;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::CorsFront;

/// The S3 server and its front; both stop when dropped.
#[derive(Debug)]
pub struct S3 {
    server: Option<JoinHandle<()>>,
    /// The front's address: what chatd and clients are given.
    pub endpoint: String,
    /// The server's own address (`http://127.0.0.1:PORT`).
    pub backend: String,
    front: CorsFront,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// The folder the server stores into: a bucket is a folder of it.
    pub root: PathBuf,
    _dir: TempDir,
}

impl S3 {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("chat-s3-").tempdir()?;
        let root = dir.path().join("root");
        let bucket = "chat-media".to_owned();
        // a bucket is a top-level folder of the root
        std::fs::create_dir_all(root.join(&bucket))?;
        let access_key = "chat-local".to_owned();
        let secret_key = format!("secret-{}-{}", std::process::id(), uuid::Uuid::new_v4());
        let fs = s3s_fs::FileSystem::new(&root)
            .map_err(|e| anyhow!("s3s-fs cannot use {}: {e:?}", root.display()))?;
        let mut service = S3ServiceBuilder::new(fs);
        service.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        let service = service.build();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(serve(listener, service));
        let backend = format!("http://{addr}");
        let front = CorsFront::start(&backend).await?;
        Ok(Self {
            server: Some(server),
            endpoint: front.endpoint.clone(),
            backend,
            front,
            access_key,
            secret_key,
            bucket,
            root,
            _dir: dir,
        })
    }

    /// From now on (or no longer), every delete is refused (403), as by a
    /// bucket policy: objects outlive what asked to delete them.
    pub fn refuse_deletes(&self, on: bool) {
        self.front.refuse_deletes(on);
    }

    /// Stops the server at once: its port refuses connections and open
    /// ones are cut (the front answers 502 Bad Gateway).
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Accepts connections until aborted; aborting drops every connection's
/// task with it.
async fn serve(listener: TcpListener, service: s3s::service::S3Service) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (socket, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "s3s-fs: accept failed");
                // out of descriptors, say: back off instead of spinning
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let service = service.clone();
        connections.spawn(async move {
            let http = Builder::new(TokioExecutor::new());
            if let Err(e) = http.serve_connection(TokioIo::new(socket), service).await {
                tracing::debug!(%peer, error = %e, "s3s-fs: connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
