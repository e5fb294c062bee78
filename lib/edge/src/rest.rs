//! The REST API of DESIGN.md: groups, membership, ownership, health.

use axum::{
    Json,
    extract::{FromRequest, Path, Query, Request, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chat_domain::{Group, UserId};
use chat_protocol::{
    AddMembersBody, BlockList, BlockView, CreateGroupBody, ErrorCode, GroupPage, GroupPresence,
    GroupSummary, GroupView, Health, InviteBody, InviteList, InviteView, JoinBody, MediaLink,
    MediaRef, MemberPresence, MemberStatus, MentionPage, MentionView, MessagePage, MessageStatus,
    MessageView, MuteBody, MuteView, PinList, PinView, ReactionView, Readiness, ReplyView,
    RestError, SearchPage, TransferOwnerBody, UpdateGroupBody, UploadBody, UploadTicket,
    format_millis, parse_millis,
};
use chat_rpc::pb;
use serde::{Deserialize, de::DeserializeOwned};

use crate::{ApiError, AppState, Caller, workers::rpc};

/// A JSON body whose every rejection (syntax, shape, size, content type) is a
/// contract error instead of axum's plain-text one.
pub(crate) struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match in_time(state, Json::<serde_json::Value>::from_request(req, state)).await? {
            Ok(Json(v)) => chat_protocol::decode_data(v)
                .map(Body)
                .map_err(ApiError::invalid),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(too_large())
            }
            Err(e) => Err(ApiError::invalid(e.body_text())),
        }
    }
}

/// `read`, the reading of a request's body, if it ends within the edge's
/// `body_read_timeout`; else 408 `invalid`, and the connection closes: a
/// client that sends a body slowly, or stops halfway, must not hold a
/// connection and its buffer for as long as it likes.
async fn in_time<R>(state: &AppState, read: impl Future<Output = R>) -> Result<R, ApiError> {
    let limit = state.config.body_read_timeout;
    tokio::time::timeout(limit, read).await.map_err(|_| {
        ApiError::invalid(format!(
            "the request body did not arrive within {} ms",
            limit.as_millis()
        ))
        .with_status(StatusCode::REQUEST_TIMEOUT)
    })
}

/// The longest page cursor a client may hand back: longer than any this
/// server gives, so one is refused before a worker reads it.
const MAX_CURSOR: usize = 128;

/// A body past the edge's limit: 413 `too_large`.
fn too_large() -> ApiError {
    ApiError::new(ErrorCode::TooLarge, "request body is too large")
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// As [`Body`], or `T`'s default for a request whose body is empty
/// (whatever its headers say, over HTTP/1 or HTTP/2): for bodies whose
/// every field is optional.
pub(crate) struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        // within the body limit, as `Body`
        let bytes = match in_time(state, axum::body::Bytes::from_request(req, state)).await? {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => return Err(ApiError::invalid(e.body_text())),
        };
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        if !json {
            return Err(ApiError::invalid(
                "a body must be JSON (Content-Type: application/json)",
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))?;
        chat_protocol::decode_data(v)
            .map(Self)
            .map_err(ApiError::invalid)
    }
}

fn view(group: pb::Group) -> Result<Json<GroupView>, ApiError> {
    let group = Group::try_from(group).map_err(|e| {
        tracing::error!(error = %e, "worker sent a bad group");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    Ok(Json(GroupView::from(&group)))
}

#[utoipa::path(post, path = "/groups", tag = "groups",
    request_body = CreateGroupBody,
    responses(
        (status = 201, description = "the group; the caller is its owner and a member", body = GroupView),
        (status = 403, description = "`forbidden`: a member blocks the caller (`PUT /blocks/{user_id}`)", body = RestError),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn create_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(body): Body<CreateGroupBody>,
) -> Result<Response, ApiError> {
    // the worker checks each member's room (a read each)
    if let Err(refused) = app.limits.user_fan_out(&me.user_id, body.members.len()) {
        return Ok(refused.into_response());
    }
    let group = rpc!(
        app,
        GroupsClient,
        create_group,
        pb::CreateGroupRequest {
            caller: me.user_id.to_string(),
            name: body.name,
            description: body.description.unwrap_or_default(),
            member_ids: body.members,
            history: body.history.unwrap_or_default(),
        }
    )?
    .into_inner();
    Ok((StatusCode::CREATED, view(group)?).into_response())
}

/// `GET /groups?limit=&after=`: one page of the caller's groups, most
/// recently updated first, and where the next page starts (`next`, null on
/// the last page).
#[derive(Debug, Deserialize)]
pub(crate) struct GroupsPage {
    limit: Option<u32>,
    after: Option<String>,
}

/// Most groups in one page, and the default.
const MAX_GROUPS_PAGE: u32 = 100;
const GROUPS_PAGE: u32 = 50;

#[utoipa::path(get, path = "/groups", tag = "groups",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 100 (default 50)"),
        ("after" = Option<String>, Query, description = "`next` of the previous page"),
    ),
    responses(
        (status = 200, description = "the caller's groups, most recently updated first", body = GroupPage),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn list_groups(
    State(app): State<AppState>,
    Caller(me): Caller,
    page: Result<Query<GroupsPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = page.limit.unwrap_or(GROUPS_PAGE);
    if !(1..=MAX_GROUPS_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_GROUPS_PAGE}"
        )));
    }
    let after = page.after.unwrap_or_default();
    if after.len() > MAX_CURSOR {
        return Err(ApiError::invalid(format!(
            "after is longer than a cursor ({MAX_CURSOR} characters)"
        )));
    }
    // a read of each group's newest message and read mark: up to `limit`
    if let Err(refused) = app.limits.user_fan_out(&me.user_id, limit as usize) {
        return Ok(refused.into_response());
    }
    let reply = rpc!(
        app,
        GroupsClient,
        list_groups,
        pb::ListGroupsRequest {
            caller: me.user_id.to_string(),
            limit,
            after,
        }
    )?
    .into_inner();
    // and the members it listed, up to the worker's cap a page (20,000)
    let members: usize = reply.groups.iter().map(|g| g.members.len()).sum();
    app.limits.user_listed(&me.user_id, members);
    let mut activity = reply.activity.into_iter();
    let views = reply
        .groups
        .into_iter()
        .map(|g| {
            let Json(group) = view(g)?;
            let a = activity.next().unwrap_or_default();
            Ok(GroupSummary {
                group,
                unread_count: a.unread,
                last_message: a.last_message.map(message_view),
                muted: a.muted,
                muted_until: mute_end(a.muted, a.muted_until_ms),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let next = Some(reply.next).filter(|n| !n.is_empty());
    Ok(Json(GroupPage {
        groups: views,
        next,
    })
    .into_response())
}

#[utoipa::path(get, path = "/groups/{id}", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 200, description = "the group", body = GroupView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn get_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let group = group_of(&app, &me, id).await?;
    app.limits.user_listed(&me.user_id, group.members.len());
    view(group)
}

/// Group `id` with its members, as `me` may see it (members only).
async fn group_of(
    app: &AppState,
    me: &chat_auth::Identity,
    id: String,
) -> Result<pb::Group, ApiError> {
    Ok(rpc!(
        app,
        GroupsClient,
        get_group,
        pb::GroupRequest {
            caller: me.user_id.to_string(),
            group_id: id,
        }
    )?
    .into_inner())
}

#[utoipa::path(get, path = "/groups/{id}/presence", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 200, description = "every member's presence (members only)", body = GroupPresence),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn group_presence(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use futures::StreamExt;
    let group = group_of(&app, &me, id).await?;
    // one read per member: charged to the caller's budget by the reads
    if let Err(refused) = app.limits.user_fan_out(&me.user_id, group.members.len()) {
        return Ok(refused.into_response());
    }
    let bucket = app.bus.presence();
    let members: Vec<MemberPresence> = futures::stream::iter(group.members)
        .map(|m| {
            let bucket = bucket.clone();
            async move {
                let user = UserId::parse(m.user_id.as_str())
                    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
                let record = bucket.get(&user).await.map_err(|e| {
                    tracing::warn!(error = %e, "presence unreadable");
                    ApiError::new(ErrorCode::Unavailable, "presence is unavailable; retry")
                })?;
                Ok(crate::presence::view(
                    m.user_id,
                    record.online(),
                    record.last_seen,
                ))
            }
        })
        .buffered(32)
        .collect::<Vec<Result<MemberPresence, ApiError>>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(Json(GroupPresence {
        group_id: group.id,
        members,
    })
    .into_response())
}

#[utoipa::path(patch, path = "/groups/{id}", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    request_body = UpdateGroupBody,
    responses(
        (status = 200, description = "the group with its new name or description (owner only); members get `a_group_updated` with `change.kind` `details_changed` if anything changed", body = GroupView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner", body = RestError)
    ))]
pub(crate) async fn update_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    Body(body): Body<UpdateGroupBody>,
) -> Result<Json<GroupView>, ApiError> {
    let group = rpc!(
        app,
        GroupsClient,
        update_group,
        pb::UpdateGroupRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            name: body.name,
            description: body.description,
        }
    )?
    .into_inner();
    app.limits.user_owes(&me.user_id, group.members.len());
    view(group)
}

#[utoipa::path(post, path = "/groups/{id}/owner", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    request_body = TransferOwnerBody,
    responses(
        (status = 200, description = "the group with its new owner (owner only)", body = GroupView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner, or the new owner blocks the caller", body = RestError)
    ))]
pub(crate) async fn transfer_owner(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    Body(body): Body<TransferOwnerBody>,
) -> Result<Json<GroupView>, ApiError> {
    let group = rpc!(
        app,
        GroupsClient,
        transfer_owner,
        pb::TransferOwnerRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            new_owner_id: body.user_id,
        }
    )?
    .into_inner();
    app.limits.user_owes(&me.user_id, group.members.len());
    view(group)
}

#[utoipa::path(post, path = "/groups/{id}/members", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    request_body = AddMembersBody,
    responses(
        (status = 200, description = "the group with the new members (owner only)", body = GroupView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner, or a new member blocks the caller", body = RestError)
    ))]
pub(crate) async fn add_members(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    Body(body): Body<AddMembersBody>,
) -> Result<Response, ApiError> {
    // the worker checks each new member's room (a read each)
    if let Err(refused) = app.limits.user_fan_out(&me.user_id, body.user_ids.len()) {
        return Ok(refused.into_response());
    }
    let group = rpc!(
        app,
        GroupsClient,
        add_members,
        pb::AddMembersRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            user_ids: body.user_ids,
        }
    )?
    .into_inner();
    app.limits.user_owes(&me.user_id, group.members.len());
    Ok(view(group)?.into_response())
}

fn invite_view(i: pb::InviteEntry) -> InviteView {
    InviteView {
        invite_id: i.invite_id,
        group_id: i.group_id,
        code: Some(i.code).filter(|c| !c.is_empty()),
        created_by: i.created_by,
        created_at: format_millis(i.created_at_ms),
        expires_at: format_millis(i.expires_at_ms),
        max_uses: (i.max_uses > 0).then_some(i.max_uses),
        uses: i.uses,
    }
}

/// `POST /groups/{id}/invites` (owner only): a new invite, with its code.
#[utoipa::path(post, path = "/groups/{id}/invites", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    request_body = InviteBody,
    responses(
        (status = 201, description = "the invite, with its `code`: the only time the code is given out (the server keeps a hash of its secret). Anyone who holds it may join with `POST /invites/join` until it expires, is used `maxUses` times or is revoked", body = InviteView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner", body = RestError)
    ))]
pub(crate) async fn create_invite(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    OptionalBody(body): OptionalBody<InviteBody>,
) -> Result<impl IntoResponse, ApiError> {
    let i = rpc!(
        app,
        GroupsClient,
        create_invite,
        pb::CreateInviteRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            expires_in_secs: body.expires_in_secs,
            max_uses: body.max_uses.unwrap_or(0),
        }
    )?
    .into_inner();
    // the code is a credential: no cache keeps it
    Ok((StatusCode::CREATED, [NO_STORE], Json(invite_view(i))))
}

/// `GET /groups/{id}/invites` (owner only).
#[utoipa::path(get, path = "/groups/{id}/invites", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 200, description = "the group's valid invites, newest first, without their codes", body = InviteList),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner", body = RestError)
    ))]
pub(crate) async fn list_invites(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<Json<InviteList>, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        list_invites,
        pb::GroupRequest {
            caller: me.user_id.to_string(),
            group_id: id,
        }
    )?
    .into_inner();
    Ok(Json(InviteList {
        invites: r.invites.into_iter().map(invite_view).collect(),
    }))
}

/// `DELETE /groups/{id}/invites/{inviteId}` (owner only).
#[utoipa::path(delete, path = "/groups/{id}/invites/{invite_id}", tag = "groups",
    params(
        ("id" = String, Path, description = "group id"),
        ("invite_id" = String, Path, description = "an invite's id"),
    ),
    responses(
        (status = 204, description = "revoked, or gone already: no one may join with it"),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors,
        (status = 403, description = "`forbidden`: not the owner", body = RestError)
    ))]
pub(crate) async fn revoke_invite(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, invite_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    rpc!(
        app,
        GroupsClient,
        revoke_invite,
        pb::RevokeInviteRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            invite_id,
        }
    )?;
    Ok(StatusCode::NO_CONTENT)
}

/// Longest invite code: a group id, an invite id and a secret.
const INVITE_CODE_MAX: usize = 256;

/// `POST /invites/join`: the caller joins the group of an invite's code.
#[utoipa::path(post, path = "/invites/join", tag = "groups",
    request_body = JoinBody,
    responses(
        (status = 200, description = "the group, with the caller a member (a member already: the group as it is, the invite unused); every member gets `a_group_updated` with `change.kind` `member_joined`. Under `joined` history the caller sees what follows its join", body = GroupView),
        (status = 400, description = "`invalid`: not an invite code; `too_large`: the group is full, or the caller is in the most groups a user may be", body = RestError),
        (status = 404, description = "`not_found`: no such invite, or it expired, was revoked or used up (one answer for all)", body = RestError),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn join_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(body): Body<JoinBody>,
) -> Result<Response, ApiError> {
    if body.code.len() > INVITE_CODE_MAX {
        return Err(ApiError::invalid("that is not an invite code"));
    }
    let group = rpc!(
        app,
        GroupsClient,
        join_group,
        pb::JoinGroupRequest {
            caller: me.user_id.to_string(),
            code: body.code,
        }
    )?
    .into_inner();
    app.limits.user_owes(&me.user_id, group.members.len());
    Ok(view(group)?.into_response())
}

/// `GET /groups/{id}/pins` (members).
#[utoipa::path(get, path = "/groups/{id}/pins", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 200, description = "the group's pinned messages the caller sees (under `joined` history, none from before it joined), newest pin first", body = PinList),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn list_pins(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<Json<PinList>, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        list_pins,
        pb::GroupRequest {
            caller: me.user_id.to_string(),
            group_id: id,
        }
    )?
    .into_inner();
    Ok(Json(pin_list(r)))
}

/// `PUT /groups/{id}/pins/{messageId}` (members).
#[utoipa::path(put, path = "/groups/{id}/pins/{message_id}", tag = "groups",
    params(
        ("id" = String, Path, description = "group id"),
        ("message_id" = String, Path, description = "a message of the group the caller sees"),
    ),
    responses(
        (status = 200, description = "pinned (or pinned already); the members who see the message get `a_group_updated` with `change.kind` `message_pinned`", body = PinList),
        (status = 400, description = "`too_large`: the group has its most pins (`--max-group-pins`, 50)", body = RestError),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn pin_message(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, message_id)): Path<(String, String)>,
) -> Result<Json<PinList>, ApiError> {
    pin_call(&app, &me.user_id, id, message_id, true)
        .await
        .map(Json)
}

/// `DELETE /groups/{id}/pins/{messageId}`.
#[utoipa::path(delete, path = "/groups/{id}/pins/{message_id}", tag = "groups",
    params(
        ("id" = String, Path, description = "group id"),
        ("message_id" = String, Path, description = "a pinned message"),
    ),
    responses(
        (status = 204, description = "unpinned (by the member who pinned it or the owner), or not pinned; the members who see the message get `a_group_updated` with `change.kind` `message_unpinned`"),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn unpin_message(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, message_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    pin_call(&app, &me.user_id, id, message_id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pin_call(
    app: &AppState,
    me: &UserId,
    group_id: String,
    message_id: String,
    pin: bool,
) -> Result<PinList, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        pin,
        pb::PinRequest {
            caller: me.to_string(),
            group_id,
            message_id,
            pin,
        }
    )?
    .into_inner();
    // as a membership change: one more request per 10 members it tells
    app.limits.user_owes(me, r.notified as usize);
    Ok(pin_list(r))
}

fn pin_list(r: pb::PinsResponse) -> PinList {
    PinList {
        group_id: r.group_id,
        pins: r
            .pins
            .into_iter()
            .map(|p| PinView {
                message_id: p.message_id,
                seq: p.seq,
                pinned_by: p.pinned_by,
                pinned_at: format_millis(p.pinned_at_ms),
            })
            .collect(),
    }
}

/// `DELETE /groups/{id}` (owner only).
#[utoipa::path(delete, path = "/groups/{id}", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 204, description = "the group is deleted for everyone (owner only): every member gets `a_group_updated` with `change.kind` `deleted`, live or on reconnect, and its messages, receipts, reactions, mentions, mutes and media are deleted; from then on it is `404` to everyone. A retry by the owner of a deletion that failed halfway finishes it"),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn delete_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        delete_group,
        pb::GroupRequest {
            caller: me.user_id.to_string(),
            group_id: id,
        }
    )?
    .into_inner();
    // as a removal: one more request per 10 members it told
    app.limits.user_owes(&me.user_id, r.notified as usize);
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /groups/{id}/members/{userId}`; `me` (or one's own id) leaves.
#[utoipa::path(delete, path = "/groups/{id}/members/{user_id}", tag = "groups",
    params(
        ("id" = String, Path, description = "group id"),
        ("user_id" = String, Path, description = "the member to remove (owner only), or `me` to leave"),
    ),
    responses(
        (status = 200, description = "the group without the member", body = GroupView),
        (status = 409, description = "the owner cannot leave: transfer first", body = RestError),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn remove_member(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, user_id)): Path<(String, String)>,
) -> Result<Json<GroupView>, ApiError> {
    // no user is called `me` (`UserId::parse_new`)
    let user_id = if user_id == UserId::ME {
        me.user_id.to_string()
    } else {
        user_id
    };
    let group = rpc!(
        app,
        GroupsClient,
        remove_member,
        pb::RemoveMemberRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            user_id,
        }
    )?
    .into_inner();
    // the one who left is told too
    app.limits.user_owes(&me.user_id, group.members.len() + 1);
    view(group)
}

/// A paged read's query string, or `invalid` saying what is wrong with it
/// (an unknown field, a bad number, a `limit` of 0).
fn paged<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
    limit: impl FnOnce(&T) -> Option<u32>,
) -> Result<T, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    if limit(&q) == Some(0) {
        return Err(ApiError::invalid("limit must be at least 1"));
    }
    Ok(q)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

/// `GET /groups/{id}/messages?before=SEQ&limit=N`: newest first, decrypted;
/// `limit` defaults to 50 and is capped at 100.
#[utoipa::path(get, path = "/groups/{id}/messages", tag = "messages",
    params(
        ("id" = String, Path, description = "group id"),
        ("before" = Option<u64>, Query, description = "only messages with a lower seq"),
        ("limit" = Option<u32>, Query, description = "1 to 100 (default 50)"),
    ),
    responses(
        (status = 200, description = "newest first, decrypted", body = MessagePage),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn history(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let q = paged(query, |q| q.limit)?;
    let r = rpc!(
        app,
        MessagesClient,
        history,
        pb::HistoryRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            before: q.before.unwrap_or(0),
            // the worker caps it
            limit: q.limit.unwrap_or(50),
        }
    )?
    .into_inner();
    let messages: Vec<MessageView> = r.messages.into_iter().map(message_view).collect();
    Ok(Json(MessagePage { messages }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    q: String,
    before: Option<u64>,
    limit: Option<u32>,
}

/// `GET /groups/{id}/search?q=WORDS&before=SEQ&limit=N`: the messages the
/// caller sees whose text holds every word of `q`, ignoring case, newest
/// first. Text is encrypted at rest, so the worker reads at most
/// `--max-search-scan` messages (and opens at most 4 MiB of them) per
/// call; `next` continues. The caller is charged one more request per 100
/// messages opened (a message longer than 1 KiB counts once per KiB).
#[utoipa::path(get, path = "/groups/{id}/search", tag = "messages",
    params(
        ("id" = String, Path, description = "group id"),
        ("q" = String, Query, description = "1 to 100 characters, at most 10 words; a message matches if its text holds every word, ignoring case"),
        ("before" = Option<u64>, Query, description = "only messages with a lower seq (the last page's `next`)"),
        ("limit" = Option<u32>, Query, description = "most matches, 1 to 50 (default 20)"),
    ),
    responses(
        (status = 200, description = "the matches among the messages this call opened, newest first, decrypted", body = SearchPage),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn search(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let q = paged(query, |q| q.limit)?;
    let r = rpc!(
        app,
        MessagesClient,
        search,
        pb::SearchRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            // the worker checks it
            query: q.q,
            before: q.before.unwrap_or(0),
            // the worker caps it
            limit: q.limit.unwrap_or(20),
        }
    )?
    .into_inner();
    // a message opened costs as a listed entry, or one per KiB if longer
    let cost = u64::from(r.opened).max(r.opened_bytes / 1024);
    app.limits
        .user_listed(&me.user_id, usize::try_from(cost).unwrap_or(usize::MAX));
    Ok(Json(SearchPage {
        messages: r.messages.into_iter().map(message_view).collect(),
        next: (r.next > 0).then_some(r.next),
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MentionsQuery {
    before: Option<String>,
    limit: Option<u32>,
}

fn block_view(b: pb::Block) -> BlockView {
    BlockView {
        user_id: b.user_id,
        since: format_millis(b.since_ms),
    }
}

/// `GET /blocks`: everyone the caller blocks, newest first.
#[utoipa::path(get, path = "/blocks", tag = "users",
    responses(
        (status = 200, description = "everyone the caller blocks, newest first", body = BlockList),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn list_blocks(
    State(app): State<AppState>,
    Caller(me): Caller,
) -> Result<Json<BlockList>, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        list_blocks,
        pb::ListBlocksRequest {
            caller: me.user_id.to_string(),
        }
    )?
    .into_inner();
    Ok(Json(BlockList {
        blocks: r.blocks.into_iter().map(block_view).collect(),
    }))
}

/// `PUT /blocks/{user_id}`: the caller blocks a user, who can then no
/// longer add the caller to a group or hand them one. Blocking again
/// changes nothing.
#[utoipa::path(put, path = "/blocks/{user_id}", tag = "users",
    params(("user_id" = String, Path, description = "the user to block")),
    responses(
        (status = 200, description = "blocked, since when", body = BlockView),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn block_user(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
) -> Result<Json<BlockView>, ApiError> {
    let b = rpc!(
        app,
        GroupsClient,
        block_user,
        pb::BlockRequest {
            caller: me.user_id.to_string(),
            user_id,
        }
    )?
    .into_inner();
    Ok(Json(block_view(b)))
}

#[utoipa::path(put, path = "/groups/{id}/mute", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    request_body = MuteBody,
    responses(
        (status = 200, description = "the caller mutes the group (members only): no push events for its messages but those that mention the caller, until `until` or `DELETE /groups/{id}/mute`; muting again replaces the end", body = MuteView),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn mute_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    OptionalBody(body): OptionalBody<MuteBody>,
) -> Result<Json<MuteView>, ApiError> {
    let until_ms = match body.until.as_deref() {
        None => 0,
        Some(t) => parse_millis(t).filter(|ms| *ms > 0).ok_or_else(|| {
            ApiError::invalid("until must be an RFC 3339 time, such as 2026-12-24T18:00:00Z")
        })?,
    };
    mute_call(&app, &me.user_id, id, true, until_ms)
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/groups/{id}/mute", tag = "groups",
    params(("id" = String, Path, description = "group id")),
    responses(
        (status = 204, description = "the caller no longer mutes the group (members only), whether or not it did"),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn unmute_group(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    mute_call(&app, &me.user_id, id, false, 0).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn mute_call(
    app: &AppState,
    me: &UserId,
    group_id: String,
    muted: bool,
    until_ms: i64,
) -> Result<MuteView, ApiError> {
    let r = rpc!(
        app,
        GroupsClient,
        mute,
        pb::MuteRequest {
            caller: me.to_string(),
            group_id,
            muted,
            until_ms,
        }
    )?
    .into_inner();
    Ok(MuteView {
        group_id: r.group_id,
        muted: r.muted,
        muted_until: mute_end(r.muted, r.until_ms),
    })
}

/// When a mute ends, as clients see it: absent unless muted with an end
/// (`until_ms` 0: until unmuted).
fn mute_end(muted: bool, until_ms: i64) -> Option<String> {
    (muted && until_ms > 0).then(|| format_millis(until_ms))
}

/// `DELETE /blocks/{user_id}`: the caller unblocks a user (204 whether or
/// not they were blocked).
#[utoipa::path(delete, path = "/blocks/{user_id}", tag = "users",
    params(("user_id" = String, Path, description = "the user to unblock")),
    responses(
        (status = 204, description = "not blocked (any more)"),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn unblock_user(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(user_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    rpc!(
        app,
        GroupsClient,
        unblock_user,
        pb::BlockRequest {
            caller: me.user_id.to_string(),
            user_id,
        }
    )?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /mentions?before=CURSOR&limit=N`: the caller's mentions, newest
/// first.
#[utoipa::path(get, path = "/mentions", tag = "messages",
    params(
        ("before" = Option<String>, Query, description = "the `next` of the previous page"),
        ("limit" = Option<u32>, Query, description = "1 to 100 (default 50)"),
    ),
    responses(
        (status = 200, description = "the caller's mentions, newest first", body = MentionPage),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn mentions(
    State(app): State<AppState>,
    Caller(me): Caller,
    query: Result<axum::extract::Query<MentionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MentionPage>, ApiError> {
    let q = paged(query, |q| q.limit)?;
    if q.before.as_ref().is_some_and(|b| b.len() > MAX_CURSOR) {
        return Err(ApiError::invalid(format!(
            "before is longer than a cursor ({MAX_CURSOR} characters)"
        )));
    }
    let r = rpc!(
        app,
        MessagesClient,
        mentions,
        pb::MentionsRequest {
            caller: me.user_id.to_string(),
            before: q.before.unwrap_or_default(),
            limit: q.limit.unwrap_or(50),
        }
    )?
    .into_inner();
    Ok(Json(MentionPage {
        mentions: r
            .mentions
            .into_iter()
            .map(|m| MentionView {
                group_id: m.group_id,
                message_id: m.message_id,
                seq: m.seq,
                sender_id: m.sender_id,
                created_at: format_millis(m.created_at_ms),
            })
            .collect(),
        next: Some(r.next).filter(|n| !n.is_empty()),
    }))
}

/// `GET /groups/{id}/messages/{messageId}/status`: delivered and read per
/// member.
#[utoipa::path(get, path = "/groups/{id}/messages/{message_id}/status", tag = "messages",
    params(
        ("id" = String, Path, description = "group id"),
        ("message_id" = String, Path, description = "message id"),
    ),
    responses(
        (status = 200, description = "delivered and read, per member", body = MessageStatus),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn message_status(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, message_id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let r = rpc!(
        app,
        MessagesClient,
        status,
        pb::StatusRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            message_id,
        }
    )?
    .into_inner();
    // a status per member, read and listed
    app.limits.user_listed(&me.user_id, r.members.len());
    let members: Vec<_> = r
        .members
        .into_iter()
        .map(|m| MemberStatus {
            user_id: m.user_id,
            delivered: m.delivered,
            read: m.read,
            updated_at: (m.updated_at_ms > 0).then(|| format_millis(m.updated_at_ms)),
        })
        .collect();
    Ok(Json(MessageStatus {
        message_id: r.message_id,
        seq: r.seq,
        members,
    }))
}

/// `POST /groups/{id}/uploads {type, mime, size}`: a pre-signed PUT URL
/// (members only).
#[utoipa::path(post, path = "/groups/{id}/uploads", tag = "media",
    params(("id" = String, Path, description = "group id")),
    request_body = UploadBody,
    responses(
        (status = 201, description = "a pre-signed PUT URL", body = UploadTicket),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn create_upload(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    Body(body): Body<UploadBody>,
) -> Result<impl IntoResponse, ApiError> {
    let r = rpc!(
        app,
        MediaClient,
        create_upload,
        pb::CreateUploadRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            r#type: body.kind,
            mime: body.mime,
            size: body.size,
        }
    )?
    .into_inner();
    Ok((
        StatusCode::CREATED,
        Json(UploadTicket {
            key: r.key,
            upload_url: r.upload_url,
            method: r.method,
            headers: r.headers.into_iter().collect(),
            expires_at: format_millis(r.expires_at_ms),
        }),
    ))
}

/// `DELETE /groups/{id}/uploads/{objectId}`: gives back the caller's own
/// upload that no message uses (an attachment dropped before sending). Its
/// object goes now and no message may use it; it counts against the
/// caller's open uploads until the cleaner removes it, like any unused
/// upload (its URL cannot be revoked).
#[utoipa::path(delete, path = "/groups/{id}/uploads/{object}", tag = "media",
    params(
        ("id" = String, Path, description = "group id"),
        ("object" = String, Path, description = "the last part of the upload's key"),
    ),
    responses(
        (status = 204, description = "given back"),
        (status = 404, description = "no unused upload of the caller's with this key", body = RestError),
        crate::openapi::CallerErrors
    ))]
pub(crate) async fn release_upload(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, object)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let key = format!("groups/{id}/{object}");
    rpc!(
        app,
        MediaClient,
        release_upload,
        pb::ReleaseUploadRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            key,
        }
    )?;
    Ok(StatusCode::NO_CONTENT)
}

/// A short-lived pre-signed GET URL of the object `groups/{id}/{objectId}`
/// (members only).
async fn media_link(
    app: &AppState,
    me: &chat_auth::Identity,
    id: String,
    object: String,
) -> Result<MediaLink, ApiError> {
    let key = format!("groups/{id}/{object}");
    let r = rpc!(
        app,
        MediaClient,
        media_url,
        pb::MediaUrlRequest {
            caller: me.user_id.to_string(),
            group_id: id,
            key,
        }
    )?
    .into_inner();
    Ok(MediaLink {
        url: r.url,
        expires_at: format_millis(r.expires_at_ms),
    })
}

/// Neither the redirect nor the link may be cached: both carry a credential.
const NO_STORE: (axum::http::HeaderName, &str) =
    (axum::http::header::CACHE_CONTROL, "private, no-store");

/// `GET /groups/{id}/media/{objectId}`: a redirect to the object's
/// pre-signed GET URL.
#[utoipa::path(get, path = "/groups/{id}/media/{object}", tag = "media",
    params(
        ("id" = String, Path, description = "group id"),
        ("object" = String, Path, description = "the last part of a message's media key"),
    ),
    responses(
        (status = 302, description = "to a pre-signed GET URL (`Location`)", body = MediaLink),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn download_media(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, object)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let link = media_link(&app, &me, id, object).await?;
    Ok((
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, link.url.clone())],
        [NO_STORE],
        Json(link),
    ))
}

/// `GET /groups/{id}/media/{objectId}/url`: the pre-signed GET URL as JSON,
/// for clients that cannot read a cross-origin redirect (a browser's
/// `fetch`) and show media with `<img src>` instead.
#[utoipa::path(get, path = "/groups/{id}/media/{object}/url", tag = "media",
    params(
        ("id" = String, Path, description = "group id"),
        ("object" = String, Path, description = "the last part of a message's media key"),
    ),
    responses(
        (status = 200, description = "a pre-signed GET URL and when it expires", body = MediaLink),
        crate::openapi::GroupErrors, crate::openapi::CallerErrors
    ))]
pub(crate) async fn media_url(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path((id, object)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(([NO_STORE], Json(media_link(&app, &me, id, object).await?)))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(),
    responses((status = 200, description = "the process is alive", body = Health)))]
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(Health {
        status: "ok".into(),
    })
}

/// Ready when NATS is connected and a worker passed its last health check
/// (which checks MongoDB): the edge's own health checks, every 500 ms, so a
/// probe costs no worker call.
pub(crate) async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let nats = app.bus.is_connected();
    let workers = app.workers.any_healthy();
    let status = if nats && workers {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { nats, workers }))
}

/// A history entry as clients see it (the live and catch-up paths build the
/// same view from the envelope, `ws/frames.rs`).
fn message_view(m: pb::ChatMessage) -> MessageView {
    MessageView {
        message_id: m.message_id,
        group_id: m.group_id,
        seq: m.seq,
        sender_id: m.sender_id,
        kind: m.r#type,
        text: Some(m.text).filter(|t| !t.is_empty()),
        media: m.media.map(|x| MediaRef {
            key: x.key,
            mime: x.mime,
            size: x.size,
        }),
        created_at: format_millis(m.created_at_ms),
        reply_to: m.reply_to.map(|r| ReplyView {
            message_id: r.message_id,
            seq: r.seq,
            sender_id: r.sender_id,
            kind: r.r#type,
            preview: Some(r.preview).filter(|p| !p.is_empty()),
            deleted: r.deleted,
        }),
        reactions: m
            .reactions
            .into_iter()
            .map(|r| ReactionView {
                emoji: r.emoji,
                count: r.count,
                reacted: r.reacted,
            })
            .collect(),
        edited_at: (m.edited_at_ms > 0).then(|| format_millis(m.edited_at_ms)),
        deleted: m.deleted,
        deleted_at: m.deleted.then(|| format_millis(m.deleted_at_ms)),
    }
}

/// The contract's documents, built on first use.
static OPENAPI: std::sync::LazyLock<String> = std::sync::LazyLock::new(crate::openapi::json);
static ASYNCAPI: std::sync::LazyLock<String> = std::sync::LazyLock::new(crate::asyncapi::json);

/// `GET /openapi.json`: the REST API (docs/openapi.json).
pub(crate) async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI.as_str(),
    )
}

/// `GET /asyncapi.json`: the WebSocket protocol (docs/asyncapi.json).
pub(crate) async fn asyncapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        ASYNCAPI.as_str(),
    )
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}
