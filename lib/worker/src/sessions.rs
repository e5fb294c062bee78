//! `Sessions`: what a device needs before it can receive anything.

use std::sync::Arc;

use chat_domain::{DeviceId, GroupId, UserId};
use chat_rpc::pb::{self, health_server::Health, sessions_server::Sessions};
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, devices, parse_id};

pub(crate) struct SessionsService(pub Arc<State>);

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let req = req.into_inner();
        let s = &*self.0;
        let user = parse_id::<UserId>(&req.user_id)?;
        let device = parse_id::<DeviceId>(&req.device_id)?;
        let name = Some(req.display_name.as_str()).filter(|n| !n.is_empty());
        let known = devices::register(s, &user, &device, name).await?;
        let groups = s
            .store
            .groups
            .subscribed_groups(&user)
            .await
            .map_err(WorkerError::from)?;
        let mut stored = s
            .places
            .get(&user, &device)
            .await
            .map_err(WorkerError::from)?;
        if known && stored.revision == 0 {
            stored = carry_over(s, &user, &device).await?;
        }
        let place = stored.place.unwrap_or_default();
        Ok(Response::new(pb::OpenSessionResponse {
            groups: groups.into_iter().map(GroupId::into_string).collect(),
            has_place: stored.place.is_some(),
            groups_place: place.groups,
            users_place: place.users,
            place_revision: stored.revision,
        }))
    }
}

/// The place of a device registered under the previous release, which kept
/// it in two durable consumers: saved into `CHAT_PLACES` once, then the
/// consumers are deleted.
async fn carry_over(
    s: &State,
    user: &UserId,
    device: &DeviceId,
) -> Result<chat_bus::Stored, WorkerError> {
    let Some(place) = s.bus.previous_place(user, device).await? else {
        // none, or another session of the device carried it over meanwhile
        return Ok(s.places.get(user, device).await?);
    };
    let saved = s.places.save(user, device, place, 0).await?;
    let chat_bus::Saved::At(revision) = saved else {
        return Ok(s.places.get(user, device).await?);
    };
    if let Err(e) = s.bus.drop_previous_consumers(user, device).await {
        tracing::warn!(user = %user, device = %device, error = %e, "cannot delete a device's consumers of the previous release; they expire when idle");
    }
    tracing::info!(user = %user, device = %device, groups = place.groups, users = place.users, "device place carried over from its consumers");
    Ok(chat_bus::Stored {
        place: Some(place),
        revision,
    })
}

pub(crate) struct HealthService(pub Arc<State>);

#[tonic::async_trait]
impl Health for HealthService {
    /// Ready once NATS answers (sends need nothing else: with MongoDB down
    /// they are still acknowledged, and the calls that need it answer
    /// `unavailable` themselves); proves the service secret over the
    /// caller's nonce.
    async fn ready(
        &self,
        req: Request<pb::ReadyRequest>,
    ) -> Result<Response<pb::ReadyResponse>, Status> {
        if !self.0.bus.is_connected() {
            return Err(
                WorkerError::Bus(chat_bus::BusError::Unavailable("not connected".into())).into(),
            );
        }
        let nonce = req.into_inner().nonce;
        if nonce.len() > 64 {
            return Err(Status::invalid_argument("nonce too long"));
        }
        let instance = self.0.instance;
        let proof = match &self.0.config.service_secret {
            Some(secret) => secret.proof(&instance, &nonce),
            None => Vec::new(),
        };
        Ok(Response::new(pb::ReadyResponse {
            proof,
            instance: instance.to_vec(),
        }))
    }
}
