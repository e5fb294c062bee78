//! `Sessions`: what a device needs before it can receive anything.

use std::sync::Arc;

use chat_domain::{DeviceId, UserId, now_millis};
use chat_rpc::pb::{self, sessions_server::Sessions};
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, parse_id};

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
        s.store
            .users
            .touch(&user, name, &device, now_millis())
            .await
            .map_err(WorkerError::from)?;
        let consumer = s
            .bus
            .ensure_user_consumer(&user, &device)
            .await
            .map_err(WorkerError::from)?;
        // the device's group consumer follows the user's subscriptions; make
        // it match them in case they changed while the device was unknown
        let groups = s
            .store
            .groups
            .subscribed_groups(&user)
            .await
            .map_err(WorkerError::from)?;
        s.bus
            .set_group_filters(&user, &device, &groups)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::OpenSessionResponse {
            consumer,
            stream: s.bus.definitions().users_stream.name.clone(),
        }))
    }

    async fn ready(
        &self,
        _: Request<pb::ReadyRequest>,
    ) -> Result<Response<pb::ReadyResponse>, Status> {
        self.0.store.ping().await.map_err(WorkerError::from)?;
        if !self.0.bus.is_connected() {
            return Err(
                WorkerError::Bus(chat_bus::BusError::Unavailable("not connected".into())).into(),
            );
        }
        Ok(Response::new(pb::ReadyResponse {}))
    }
}
