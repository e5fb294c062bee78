//! `Groups`: creation, membership and ownership (seed §1), and the
//! notifications that go with them.

use std::sync::Arc;

use bytes::Bytes;
use chat_domain::{DomainError, Group, GroupChange, GroupId, UserId, now_millis};
use chat_protocol::{GroupEvent, GroupView, event, push_json};
use chat_rpc::pb::{self, groups_server::Groups};
use chat_store::GroupRecord;
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, devices::Lease, parse_id};

/// How often a change is retried when another change to the same group won
/// the race.
const CAS_ATTEMPTS: usize = 8;

pub(crate) struct GroupsService(pub Arc<State>);

impl GroupsService {
    async fn load(&self, id: &GroupId) -> Result<GroupRecord, WorkerError> {
        self.0.load(id).await
    }

    async fn load_as_member(
        &self,
        caller: &UserId,
        id: &GroupId,
    ) -> Result<GroupRecord, WorkerError> {
        self.0.load_as_member(caller, id).await
    }

    /// Publishes one event to each user's notification subject, all in
    /// flight at once, and waits for JetStream to store every one.
    async fn publish_to_users(
        &self,
        users: &[UserId],
        name: &str,
        group: &Group,
        dedup_prefix: &str,
    ) -> Result<(), WorkerError> {
        let payload = push_json(
            name,
            &GroupEvent {
                group: GroupView::from(group),
            },
        )
        .map_err(|e| WorkerError::Domain(DomainError::Invalid(e.to_string())))?;
        let payload = Bytes::from(payload);
        let publishes = users.iter().map(|u| {
            let id = format!("{dedup_prefix}-{u}");
            let payload = payload.clone();
            async move { self.0.bus.publish_user_event(u, &id, payload).await }
        });
        for result in futures::future::join_all(publishes).await {
            result?;
        }
        Ok(())
    }

    /// Applies a membership or ownership change with compare-and-set, then
    /// tells everyone concerned. A member who leaves or is removed has its
    /// devices stop following the group before the change commits, under
    /// its filter lease (see `devices.rs`), and set from the stored truth
    /// after it, whether or not the change went through.
    async fn change(
        &self,
        caller: &str,
        group_id: &str,
        change: GroupChange,
    ) -> Result<Group, WorkerError> {
        let caller = parse_id::<UserId>(caller)?;
        let id = parse_id::<GroupId>(group_id)?;
        let leaving = match &change {
            GroupChange::Leave => Some(caller.clone()),
            GroupChange::RemoveMember { user_id } => Some(user_id.clone()),
            _ => None,
        };
        let Some(leaving) = leaving else {
            return self.apply(&caller, &id, change).await;
        };
        // refuse what the caller may not do before touching anyone's
        // filters: a narrowing that is undone still loses the live messages
        // published in between for that member
        self.load(&id).await?.group.apply(
            &caller,
            change.clone(),
            &self.0.config.limits,
            now_millis(),
        )?;
        let lease = Lease::take(&self.0, &leaving).await?;
        let result = async {
            let without = lease.subscribed(Some(&id)).await?;
            lease.set_filters(&without).await?;
            self.apply(&caller, &id, change).await
        }
        .await;
        let synced = lease.sync().await;
        lease.release().await;
        let group = result?;
        synced?;
        Ok(group)
    }

    async fn apply(
        &self,
        caller: &UserId,
        id: &GroupId,
        change: GroupChange,
    ) -> Result<Group, WorkerError> {
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.load(id).await?;
            let audience =
                record
                    .group
                    .apply(caller, change.clone(), &self.0.config.limits, now_millis())?;
            if !self.0.store.groups.replace_if_rev(&record).await? {
                continue;
            }
            record.rev += 1;
            let group = record.group;
            let prefix = format!("upd-{}-{}", group.id, record.rev);
            self.publish_to_users(&audience, event::GROUP_UPDATED, &group, &prefix)
                .await?;
            return Ok(group);
        }
        Err(WorkerError::Store(chat_store::StoreError::Unavailable(
            "too many concurrent changes to this group".into(),
        )))
    }
}

fn reply(group: &Group) -> Response<pb::Group> {
    Response::new(pb::Group::from(group))
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn create_group(
        &self,
        req: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let limits = &self.0.config.limits;
        // refuse huge lists before parsing them
        if req.member_ids.len() > limits.group_members {
            return Err(WorkerError::Domain(DomainError::TooLarge(format!(
                "a group may have at most {} members",
                limits.group_members
            )))
            .into());
        }
        let members = req
            .member_ids
            .iter()
            .map(|m| {
                UserId::parse(m.as_str())
                    .map_err(|e| DomainError::Invalid(format!("member {m:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(WorkerError::from)?;
        let group = Group::create(
            GroupId::generate(),
            caller,
            &req.name,
            &req.description,
            members,
            limits,
            now_millis(),
        )
        .map_err(WorkerError::from)?;
        self.0
            .store
            .groups
            .insert(&group)
            .await
            .map_err(WorkerError::from)?;
        tracing::info!(group = %group.id, members = group.members.len(), "group created");
        Ok(reply(&group))
    }

    async fn get_group(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        Ok(reply(&self.load_as_member(&caller, &id).await?.group))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = parse_id::<UserId>(&req.into_inner().caller)?;
        let groups = self
            .0
            .store
            .groups
            .list_for_member(&caller, self.0.config.max_listed_groups)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups.iter().map(pb::Group::from).collect(),
        }))
    }

    async fn transfer_owner(
        &self,
        req: Request<pb::TransferOwnerRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let new_owner = parse_id::<UserId>(&req.new_owner_id)?;
        let group = self
            .change(
                &req.caller,
                &req.group_id,
                GroupChange::TransferOwner { new_owner },
            )
            .await?;
        Ok(reply(&group))
    }

    async fn add_members(
        &self,
        req: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        if req.user_ids.len() > self.0.config.limits.group_members {
            return Err(WorkerError::Domain(DomainError::TooLarge(format!(
                "a group may have at most {} members",
                self.0.config.limits.group_members
            )))
            .into());
        }
        let user_ids = req
            .user_ids
            .iter()
            .map(|u| parse_id::<UserId>(u))
            .collect::<Result<Vec<_>, _>>()?;
        let group = self
            .change(
                &req.caller,
                &req.group_id,
                GroupChange::AddMembers { user_ids },
            )
            .await?;
        Ok(reply(&group))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let change = if req.user_id == req.caller {
            GroupChange::Leave
        } else {
            GroupChange::RemoveMember {
                user_id: parse_id::<UserId>(&req.user_id)?,
            }
        };
        let group = self.change(&req.caller, &req.group_id, change).await?;
        Ok(reply(&group))
    }

    async fn notify_group_created(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::NotifyResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let record = self.load_as_member(&caller, &id).await?;
        let members: Vec<UserId> = record.group.member_ids().cloned().collect();
        if !record.created_notified {
            // publish first, then mark: a crash in between means a retry
            // publishes again, and JetStream drops the duplicates by id
            let prefix = format!("created-{id}");
            self.publish_to_users(&members, event::GROUP_CREATED, &record.group, &prefix)
                .await?;
            self.0
                .store
                .groups
                .mark_created_notified(&id)
                .await
                .map_err(WorkerError::from)?;
        }
        Ok(Response::new(pb::NotifyResponse {
            notified: members.len() as u32,
        }))
    }

    async fn subscribe_to_group(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        self.0.check_member(&caller, &id).await?;
        if !self
            .0
            .store
            .groups
            .add_subscriber(&id, &caller)
            .await
            .map_err(WorkerError::from)?
        {
            // removed between the check and the write
            return Err(WorkerError::Domain(DomainError::Forbidden(
                "you are not a member of this group".into(),
            ))
            .into());
        }
        let lease = Lease::take(&self.0, &caller).await?;
        let synced = lease.sync().await;
        lease.release().await;
        synced?;
        Ok(Response::new(pb::SubscribeResponse {
            group_id: id.into_string(),
        }))
    }
}
