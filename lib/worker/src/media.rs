//! `Media` (seed §3): pre-signed upload and download URLs, the checks a
//! media message must pass, and the cleaner of uploads no message uses.

use std::{sync::Arc, time::Duration};

use chat_domain::{DomainError, GroupId, MessageKind, UserId, now_millis};
use chat_rpc::pb::{self, media_server::Media};
use chat_store::{Objects, StoreError, Upload};
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, parse_id};

/// The media part of a sealed message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MediaContent {
    pub key: String,
    pub mime: String,
    pub size: u64,
}

fn objects(s: &State) -> Result<&Objects, WorkerError> {
    s.objects.as_ref().ok_or_else(|| {
        WorkerError::Store(StoreError::Unavailable(
            "media storage is not configured".into(),
        ))
    })
}

fn invalid(m: impl Into<String>) -> WorkerError {
    DomainError::Invalid(m.into()).into()
}

/// The object key of a new upload: namespaced by group, unguessable.
fn new_key(group: &GroupId) -> String {
    format!("groups/{group}/{}", uuid::Uuid::new_v4().simple())
}

/// Checks that `key` names an object of `group` (and nothing else).
fn check_key(group: &GroupId, key: &str) -> Result<(), WorkerError> {
    let prefix = format!("groups/{group}/");
    let ok = key
        .strip_prefix(&prefix)
        .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(invalid("media key does not name an object of this group"))
    }
}

/// Checks a media message's `media` against its upload and the stored object,
/// then claims the upload so the cleaner leaves it alone.
pub(crate) async fn check_media(
    s: &State,
    group: &GroupId,
    kind: MessageKind,
    media: Option<pb::MediaRef>,
) -> Result<MediaContent, WorkerError> {
    let media = media.ok_or_else(|| {
        invalid(format!(
            "a {} message needs media {{key, mime, size}}",
            kind.as_str()
        ))
    })?;
    s.config.media.check(kind, &media.mime, media.size)?;
    check_key(group, &media.key)?;
    let objects = objects(s)?;
    let upload = s
        .store
        .uploads
        .get(group, &media.key)
        .await?
        .ok_or_else(|| invalid("no upload with this key in this group"))?;
    if upload.kind != kind.as_str() || upload.mime != media.mime || upload.size != media.size {
        return Err(invalid(format!(
            "media does not match its upload ({} {} of {} bytes)",
            upload.kind, upload.mime, upload.size
        )));
    }
    let info = objects
        .head(&media.key)
        .await?
        .ok_or_else(|| invalid("the object has not been uploaded"))?;
    if info.size != media.size {
        // not what was declared (possibly far larger): no message will ever
        // use it, so its object goes now; its record stays for the cleaner
        // (forgetting it would leave what its URL writes later to nobody)
        if let Err(e) = withdraw(s, objects, group, &media.key, &upload.uploader_id).await {
            tracing::warn!(key = %media.key, error = %e, "cannot withdraw a mismatched upload; the cleaner will delete it");
        }
        return Err(invalid(format!(
            "the uploaded object is {} bytes, not {}",
            info.size, media.size
        )));
    }
    if let Some(ct) = info.content_type.as_deref().filter(|ct| *ct != media.mime) {
        return Err(invalid(format!(
            "the uploaded object is {ct}, not {}",
            media.mime
        )));
    }
    // the message gets a copy under a key no upload URL was ever made for,
    // so the bytes it names can never change: the uploader's URL stays valid
    // until it expires and could otherwise replace them (or, after a
    // removal, put anything there)
    let media_key = new_key(group);
    // the message this copy goes with gets a seq above this: a member who
    // joined after it may download the copy (media_url)
    let after_seq = crate::publish::newest_seq(s, group).await?;
    if !s
        .store
        .uploads
        .claim(&media.key, &media_key, after_seq)
        .await?
    {
        return Err(invalid("this upload has expired or is used already"));
    }
    let copied = async {
        objects.copy(&media.key, &media_key).await?;
        // what was copied is checked again: the upload could have been
        // replaced between the first look and the copy
        let copy = objects.head(&media_key).await?;
        Ok::<_, StoreError>(copy.filter(|c| {
            c.size == media.size && c.content_type.as_deref().is_none_or(|ct| ct == media.mime)
        }))
    }
    .await;
    match copied {
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => {
            let _ = objects.delete(&media_key).await;
            s.store.uploads.unclaim(&media.key).await?;
            copied?;
            return Err(invalid("the uploaded object changed while it was checked"));
        }
    }
    // the upload's own object is not needed any more (the cleaner deletes it
    // again once the URL has expired, in case it was put again)
    if let Err(e) = objects.delete(&media.key).await {
        tracing::debug!(key = %media.key, error = %e, "cannot delete a copied upload yet; the cleaner will");
    }
    Ok(MediaContent {
        key: media_key,
        mime: media.mime,
        size: media.size,
    })
}

/// An upload claimed by a send that has not been published yet: dropped
/// without [`Claim::keep`] (the send failed before publishing), it gives the
/// upload back and deletes the copy, in a task of its own.
pub(crate) struct Claim {
    objects: Objects,
    uploads: chat_store::UploadRepo,
    upload: String,
    copy: String,
    armed: bool,
}

impl Claim {
    pub(crate) fn new(s: &State, upload: &str, copy: &str) -> Option<Self> {
        Some(Self {
            objects: s.objects.clone()?,
            uploads: s.store.uploads.clone(),
            upload: upload.to_owned(),
            copy: copy.to_owned(),
            armed: true,
        })
    }

    /// The send went on: the claim stays.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }

    /// Gives the upload back now.
    pub(crate) async fn give_back(mut self) {
        self.armed = false;
        give_back(&self.objects, &self.uploads, &self.upload, &self.copy).await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (objects, uploads) = (self.objects.clone(), self.uploads.clone());
        let (upload, copy) = (
            std::mem::take(&mut self.upload),
            std::mem::take(&mut self.copy),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { give_back(&objects, &uploads, &upload, &copy).await });
        }
    }
}

/// Withdraws `uploader`'s upload `key` of `group` that no message uses: no
/// message may claim it from now on, and its object goes now. Its record
/// stays, counted against the uploader, until the cleaner deletes it with
/// whatever its URL (which cannot be revoked) writes meanwhile. False if
/// there is no such upload.
async fn withdraw(
    s: &State,
    objects: &Objects,
    group: &GroupId,
    key: &str,
    uploader: &str,
) -> Result<bool, StoreError> {
    if !s.store.uploads.release(group, key, uploader).await? {
        return Ok(false);
    }
    if let Err(e) = objects.delete(key).await {
        tracing::warn!(key, error = %e, "cannot delete a withdrawn upload yet; the cleaner will");
    }
    Ok(true)
}

async fn give_back(objects: &Objects, uploads: &chat_store::UploadRepo, upload: &str, copy: &str) {
    let given_back = async {
        objects.delete(copy).await?;
        uploads.unclaim(upload).await
    };
    if let Err(e) = given_back.await {
        tracing::warn!(upload, error = %e, "cannot give back an upload of a failed send");
    }
}

/// Deletes the objects of upload `u`: its own, and a message's copy (a
/// deleted group's upload has one).
async fn delete_objects(
    objects: &chat_store::Objects,
    u: &Upload,
) -> Result<(), chat_store::StoreError> {
    objects.delete(&u.key).await?;
    if let Some(copy) = &u.media_key {
        objects.delete(copy).await?;
    }
    Ok(())
}

/// Deletes uploads that no message claimed within the configured time.
/// Safe on several workers: each upload is claimed for deletion atomically.
pub(crate) async fn clean_uploads(s: Arc<State>) {
    let Some(objects) = s.objects.clone() else {
        return;
    };
    let every = (s.config.unreferenced_upload_ttl / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let before = now_millis() - s.config.unreferenced_upload_ttl.as_millis() as i64;
        // claimed uploads whose URL has expired: whatever was put at their
        // own key after the claim goes, and once more when no PUT begun
        // before the expiry can still be under way (as long as an unused
        // upload is kept), for good
        let expired = now_millis() - s.config.upload_url_ttl.as_millis() as i64 - 1000;
        let settled = before.min(expired);
        // a deleted group's uploads: their objects go now, and again (with
        // their records) once settled, so that a PUT whose URL was issued
        // before the deletion cannot leave an object no record names
        match s.store.uploads.to_sweep(100).await {
            Ok(sweep) => {
                for u in sweep {
                    let swept = async {
                        delete_objects(&objects, &u).await?;
                        s.store.uploads.mark_swept(&u.key).await
                    };
                    if let Err(e) = swept.await {
                        tracing::debug!(key = %u.key, error = %e, "cannot delete a deleted group's upload yet");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot list a deleted group's uploads"),
        }
        let mut batch: Vec<Upload> = match s.store.uploads.deleting(settled, 100).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list uploads being deleted");
                continue;
            }
        };
        match s.store.uploads.claim_stale(before, 100).await {
            Ok(v) => batch.extend(v),
            Err(e) => tracing::debug!(error = %e, "cannot claim stale uploads"),
        }
        match s.store.uploads.expired_claimed(expired, settled, 100).await {
            Ok(claimed) => {
                for (u, last) in claimed {
                    let purged = async {
                        objects.delete(&u.key).await?;
                        s.store.uploads.mark_purged(&u.key, last).await
                    };
                    if let Err(e) = purged.await {
                        tracing::debug!(key = %u.key, error = %e, "cannot purge a claimed upload yet");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot list claimed uploads"),
        }
        for u in batch {
            let done = async {
                delete_objects(&objects, &u).await?;
                s.store.uploads.remove(&u.key).await
            };
            match done.await {
                Ok(()) => tracing::info!(key = %u.key, "deleted an upload no message used"),
                Err(e) => tracing::debug!(key = %u.key, error = %e, "cannot delete an upload yet"),
            }
        }
    }
}

pub(crate) struct MediaService(pub Arc<State>);

#[tonic::async_trait]
impl Media for MediaService {
    async fn create_upload(
        &self,
        req: Request<pb::CreateUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let kind = MessageKind::parse(&req.r#type).map_err(WorkerError::from)?;
        s.config
            .media
            .check(kind, &req.mime, req.size)
            .map_err(WorkerError::from)?;
        s.check_member(&caller, &group).await?;
        let objects = objects(s)?;
        // what the caller holds unused, counting one past the cap at most
        // (a soft cap: two tickets at once may pass it by one)
        let policy = &s.config.media;
        let (open, open_bytes) = s
            .store
            .uploads
            .open_of(caller.as_str(), policy.open_uploads_per_user as i64 + 1)
            .await
            .map_err(WorkerError::from)?;
        policy
            .check_open(open, open_bytes, req.size)
            .map_err(WorkerError::from)?;
        let key = new_key(&group);
        let ttl = s.config.upload_url_ttl;
        let now = now_millis();
        let (url, headers) = objects
            .sign_put(&key, &req.mime, req.size, ttl)
            .map_err(WorkerError::from)?;
        let upload = Upload {
            key: key.clone(),
            group_id: group.to_string(),
            uploader_id: caller.to_string(),
            kind: kind.as_str().to_owned(),
            mime: req.mime,
            size: req.size,
            created_at: now,
            media_key: None,
        };
        s.store
            .uploads
            .insert(&upload)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::CreateUploadResponse {
            key,
            upload_url: url,
            method: "PUT".into(),
            headers: headers.into_iter().collect(),
            expires_at_ms: url_expiry(now, ttl),
        }))
    }

    async fn release_upload(
        &self,
        req: Request<pb::ReleaseUploadRequest>,
    ) -> Result<Response<pb::ReleaseUploadResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        check_key(&group, &req.key)?;
        let objects = objects(s)?;
        // the uploader's own, unused: no membership needed to give it back
        let withdrawn = withdraw(s, objects, &group, &req.key, caller.as_str())
            .await
            .map_err(WorkerError::from)?;
        if !withdrawn {
            return Err(WorkerError::NotFound("upload").into());
        }
        Ok(Response::new(pb::ReleaseUploadResponse {}))
    }

    async fn media_url(
        &self,
        req: Request<pb::MediaUrlRequest>,
    ) -> Result<Response<pb::MediaUrlResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let from = s.check_member(&caller, &group).await?;
        check_key(&group, &req.key)?;
        let objects = objects(s)?;
        // only objects messages use: never an upload's own key, which its
        // uploader (perhaps removed since) can still write to; and under
        // `joined` history only those of messages sent after the caller
        // joined (their seq is above the group's newest when the object was
        // claimed; a message at the boundary may be refused, never one from
        // before let through)
        let after = s
            .store
            .uploads
            .media_after(&group, &req.key)
            .await
            .map_err(WorkerError::from)?;
        if after.is_none_or(|after| after < from)
            || objects
                .head(&req.key)
                .await
                .map_err(WorkerError::from)?
                .is_none()
        {
            return Err(WorkerError::NotFound("media").into());
        }
        let ttl = s.config.download_url_ttl;
        let now = now_millis();
        let url = objects
            .sign_get(&req.key, ttl)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::MediaUrlResponse {
            url,
            expires_at_ms: url_expiry(now, ttl),
        }))
    }
}

/// When a URL signed at or after `now` with `ttl` stops working, as told to
/// clients: a signature's date has whole seconds, so the URL expires up to a
/// second before `now + ttl`; the time told is never later than the real one.
fn url_expiry(now: i64, ttl: std::time::Duration) -> i64 {
    now - now.rem_euclid(1000) + ttl.as_millis() as i64
}
