//! gRPC between edge and worker: the code generated from
//! `proto/chat/v1/chat.proto`, and conversions to and from domain types.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("chat.v1");
}

mod service_auth;
pub mod signed;
pub mod tls;

pub use service_auth::{Call, Instance, SecretError, ServiceSecret};
pub use signed::{Checked, Checker, SIGNATURE_HEADER, Signed, WorkerInstance};
pub use tls::{ClientTls, ServerTls, TlsError};

use chat_domain::{DomainError, Group, GroupId, History, Member, UserId};

/// Why a gRPC value could not become a domain value: the peer sent something
/// this build does not accept.
#[derive(Debug, thiserror::Error)]
#[error("bad {field} from peer: {source}")]
pub struct ConvertError {
    field: &'static str,
    source: DomainError,
}

fn parse<T>(
    field: &'static str,
    f: impl FnOnce(String) -> Result<T, DomainError>,
    v: String,
) -> Result<T, ConvertError> {
    f(v).map_err(|source| ConvertError { field, source })
}

impl From<&Group> for pb::Group {
    fn from(g: &Group) -> Self {
        Self {
            id: g.id.to_string(),
            name: g.name.clone(),
            description: g.description.clone(),
            owner_id: g.owner_id.to_string(),
            created_by: g.created_by.to_string(),
            members: g
                .members
                .iter()
                .map(|m| pb::Member {
                    user_id: m.user_id.to_string(),
                    joined_at_ms: m.joined_at,
                    joined_seq: m.joined_seq,
                })
                .collect(),
            history: g.history.as_str().to_owned(),
            created_at_ms: g.created_at,
            updated_at_ms: g.updated_at,
        }
    }
}

impl TryFrom<pb::Group> for Group {
    type Error = ConvertError;

    fn try_from(g: pb::Group) -> Result<Self, Self::Error> {
        Ok(Self {
            id: parse("group id", GroupId::parse, g.id)?,
            name: g.name,
            description: g.description,
            owner_id: parse("owner id", UserId::parse, g.owner_id)?,
            created_by: parse("creator id", UserId::parse, g.created_by)?,
            members: g
                .members
                .into_iter()
                .map(|m| {
                    Ok(Member {
                        user_id: parse("member id", UserId::parse, m.user_id)?,
                        joined_at: m.joined_at_ms,
                        joined_seq: m.joined_seq,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
            history: parse("history", |h| History::parse(&h), g.history)?,
            created_at: g.created_at_ms,
            updated_at: g.updated_at_ms,
            // pins travel on their own (`ListPins`): each member is given
            // only those it may see
            pins: Vec::new(),
            // invites are the owner's, listed on their own (`ListInvites`)
            invites: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use chat_domain::Limits;

    use super::*;

    #[test]
    fn groups_round_trip() {
        let g = Group::create(
            GroupId::generate(),
            UserId::parse("o").expect("id"),
            "n",
            "d",
            vec![UserId::parse("m").expect("id")],
            &Limits::default(),
            5,
        )
        .expect("group")
        .with_history(History::Joined);
        let back = Group::try_from(pb::Group::from(&g)).expect("converts");
        assert_eq!(back, g);
        let mut bad = pb::Group::from(&g);
        bad.owner_id = "a.b".into();
        assert!(Group::try_from(bad).is_err());
    }
}
