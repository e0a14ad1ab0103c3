//! The JSON shapes of the HTTP API that are written by hand rather than
//! serialized from a Rust type (the `/api/send` report keeps the caller's
//! spelling of each target), described for the OpenAPI document
//! ([`openapi`](super::openapi)). The Schemathesis run in the test suite
//! checks every answer against them, so a change to the code that these
//! do not follow fails the tests.

use serde::Serialize;
use utoipa::ToSchema;

/// Every error: `{"error":{"code","message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub(crate) error: ErrorDetail,
}

/// The code and message of an [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// A stable, machine-readable code such as `"invalid_query"`.
    pub(crate) code: String,
    /// What went wrong and how to fix it, for people.
    pub(crate) message: String,
}

/// A client ID: 1 to 128 of `A-Z a-z 0-9 - _ . : @`, or an integer (`1`
/// and `"1"` are the same ID).
#[derive(Debug, Serialize)]
#[serde(untagged)]
// Built only by serde in tests; here it describes what the handlers write.
#[allow(dead_code)]
pub(crate) enum Target {
    /// An ID written as a string.
    Name(String),
    /// An ID written as an integer.
    Number(i64),
}

/// The pattern of a client ID written as a string.
pub(crate) const ID_PATTERN: &str = r"^[A-Za-z0-9_.:@-]{1,128}$";

impl utoipa::PartialSchema for Target {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(ID_PATTERN)),
            )
            // What the relay's parser takes: any 64-bit integer, signed or
            // not (larger ones are 400 `invalid_target`).
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(utoipa::Number::Int(i64::MIN as isize)))
                    .maximum(Some(utoipa::Number::UInt(u64::MAX as usize))),
            )
            .description(Some(
                "A client ID: 1 to 128 of `A-Z a-z 0-9 - _ . : @`, or a 64-bit integer written without a fraction or exponent (`1`, not `1.0`; `1` and `\"1\"` are the same ID)",
            ))
            .into()
    }
}

impl ToSchema for Target {}

/// `POST /api/send`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SendRequest {
    /// The client IDs to send to (at most `limits.max_targets`; an empty
    /// list sends nothing and answers empty lists).
    pub(crate) targets: Vec<Target>,
    /// Any JSON value: each connection of each target receives its JSON
    /// text exactly as written here.
    pub(crate) payload: serde_json::Value,
}

/// The delivery report of `POST /api/send`: every target as written, in
/// exactly one of the lists.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryReport {
    /// Targets with a connection that accepted the message.
    pub(crate) delivered: Vec<Target>,
    /// Targets with no live connection.
    pub(crate) offline: Vec<Target>,
    /// Targets connected whose every connection refused the message
    /// (queue full or closing).
    pub(crate) dropped: Vec<Target>,
    /// Clustered backends only: targets whose delivery on another node
    /// could not be confirmed.
    pub(crate) unconfirmed: Option<Vec<Target>>,
}

/// `POST /api/publish`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PublishRequest {
    /// The topic: 1 to 128 of `A-Z a-z 0-9 - _ . : @ /`.
    #[schema(pattern = r"^[A-Za-z0-9_.:@/-]{1,128}$")]
    pub(crate) topic: String,
    /// Any JSON value, sent to every subscriber as written.
    pub(crate) payload: serde_json::Value,
}

/// The answer of `POST /api/publish`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PublishReport {
    /// Connections the message was queued to.
    pub(crate) recipients: u64,
}

/// The answer of `GET /api/connections`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Connections {
    /// Every client ID with its connections.
    pub(crate) clients: Vec<crate::backend::ClientInfo>,
    /// How many IDs are listed.
    pub(crate) clients_total: u64,
    /// WebSocket connections open on this node.
    pub(crate) connections_open: u64,
    /// Clustered backends only: `"cluster"` or `"local"`.
    pub(crate) scope: Option<String>,
    /// Clustered backends only: the node that answered.
    pub(crate) node: Option<String>,
    /// Present (`true`) when a cluster listing was asked for and could
    /// not be made: this is the node's own.
    pub(crate) degraded: Option<bool>,
}

/// The answer of `DELETE /api/connections/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Disconnected {
    /// Connections closed with code 4000.
    pub(crate) closed: u64,
}

/// The answer of `GET /heartbeat` (and of `GET /ready` while ready).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Heartbeat {
    /// `"ok"`, or `"degraded"` while a clustered backend has lost its
    /// backplane (still 200: the node serves its own clients), or
    /// `"draining"` while draining; `/ready` answers `"ready"`.
    pub(crate) status: String,
    /// While draining: the connections still open.
    pub(crate) connections: Option<u64>,
    /// When degraded: the backend's name.
    pub(crate) backend: Option<String>,
    /// When degraded: this node's ID.
    pub(crate) node: Option<String>,
    /// When degraded: why.
    pub(crate) reason: Option<String>,
}

/// The answer of `POST /api/drain`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DrainReport {
    /// Always `true`: the node is draining.
    pub(crate) draining: bool,
    /// Whether this call started the drain (`false`: it was under way).
    pub(crate) started_now: bool,
    /// The window the reconnect delays are spread over, in milliseconds.
    pub(crate) window_ms: u64,
    /// What a v1 client gets beyond its delay before its 1012, in ms.
    pub(crate) grace_ms: u64,
    /// Time since the drain started, in milliseconds.
    pub(crate) elapsed_ms: u64,
    /// v1 connections told to move when the drain started.
    pub(crate) v1_connections: u64,
    /// Plain connections to be closed over the window.
    pub(crate) plain_connections: u64,
}

/// The answer of `GET /api/presence/{topic}` (docs/protocol-v1.md,
/// "Presence").
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Presence {
    /// The topic asked about.
    pub(crate) topic: String,
    /// The topic's presence revision.
    pub(crate) rev: u64,
    /// Members (client IDs) present over the cluster.
    pub(crate) count: u64,
    /// With `mode=full` (and at most `v1.presence_max_members`): the members.
    pub(crate) members: Option<Vec<PresenceMemberInfo>>,
    /// `true` when the topic has more members than are listed.
    pub(crate) truncated: Option<bool>,
}

/// One member in a presence snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresenceMemberInfo {
    /// The client ID.
    pub(crate) id: String,
    /// Its connections subscribed to the topic, over every node.
    pub(crate) conns: u64,
    /// When it joined (Unix time, milliseconds).
    pub(crate) since_ms: u64,
    /// Its meta (from the `sb_presence` claim, or the client when allowed).
    pub(crate) meta: Option<serde_json::Value>,
}
