//! `Sessions`: what a device needs before it can receive anything.

use std::sync::Arc;

use chat_domain::{DeviceId, GroupId, UserId};
use chat_rpc::pb::{self, health_server::Health, sessions_server::Sessions};
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, devices::Lease, parse_id};

pub(crate) struct SessionsService(pub Arc<State>);

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let user = parse_id::<UserId>(&req.user_id)?;
        let device = parse_id::<DeviceId>(&req.device_id)?;
        let name = Some(req.display_name.as_str()).filter(|n| !n.is_empty());
        // registering (which may evict another device of the user) and
        // making the consumers happen under the user's lease, so a device
        // evicted by a concurrent session never gets consumers back behind
        // the registry's back; the group consumer is made to match the
        // user's subscriptions in case they changed while it was away
        let lease = Lease::take(s, &user).await?;
        let ensured = async {
            lease.register(&device, name).await?;
            let groups = lease.subscribed(None).await?;
            lease.check_fresh()?;
            let consumer = s.bus.ensure_device(&user, &device, &groups).await?;
            Ok::<_, WorkerError>((consumer, groups))
        }
        .await;
        lease.release().await;
        let (consumer, groups) = ensured?;
        Ok(Response::new(pb::OpenSessionResponse {
            consumer,
            stream: s.bus.definitions().users_stream.name.clone(),
            groups: groups.into_iter().map(GroupId::into_string).collect(),
        }))
    }
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
        let proof = match &self.0.config.service_secret {
            Some(secret) => secret.proof(&nonce),
            None => Vec::new(),
        };
        Ok(Response::new(pb::ReadyResponse { proof }))
    }
}
