//! The frames a `switchboard.v1` client sends (docs/protocol-v1.md,
//! "Client to server"), parsed with the plain relay's rules for targets,
//! topics and payloads, so both protocols refuse the same bad input with
//! the same codes.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::relay::{
    RequestError, TargetName, Targets, object_str, parse_targets, parse_topic, present,
    require_payload,
};
use crate::backend::{MAX_META_BYTES, PresenceMode, ResumePoint};
use crate::id::Topic;
use crate::runtime::delivery::MAX_REQUEST_ID;

/// The longest message id (`mid`).
pub(crate) const MAX_MID_LEN: usize = 64;

/// One request: its id, if it has one, and what it asks.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(crate) id: Option<u64>,
    pub(crate) kind: Kind<'a>,
}

/// What a request asks. `Send` is far larger than the others (its targets
/// sit inline, up to 4 in a `SmallVec`, as the plain relay's do): a
/// `Kind` lives on the stack for one frame, and boxing the targets would
/// put back the allocation per send the immediate path removed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Kind<'a> {
    Hello {
        resume: Option<ResumePoint>,
    },
    Send {
        mid: Option<Cow<'a, str>>,
        /// Named by their text (borrowed from the frame, or a number's
        /// digits): a send at once makes no `ClientId` per target.
        targets: Targets<TargetName<'a>>,
        payload: &'a RawValue,
    },
    Publish {
        topic: Topic,
        payload: &'a RawValue,
    },
    Subscribe {
        topic: Topic,
        /// What of the topic's presence the client wants; `None`: nothing.
        presence: Option<PresenceMode>,
        /// The member meta the client gives (JSON, at most 1 KiB).
        meta: Option<&'a RawValue>,
    },
    Unsubscribe(Topic),
    PresenceGet {
        topic: Topic,
        mode: PresenceMode,
    },
    Replay {
        from: u64,
        to: u64,
    },
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A request that could not be used, with its id when that much was
/// readable, so the error can be tied to it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) id: Option<u64>,
    pub(crate) error: RequestError,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    mid: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    targets: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    resume: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    from: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    to: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    meta: Option<&'a RawValue>,
}

const TYPES: &str = "\"hello\", \"send\", \"publish\", \"subscribe\", \"unsubscribe\", \"presence_get\", \"replay\" or \"refresh\"";

/// Parses one client frame (a text frame's text); `max_targets` bounds a
/// send's target list.
pub(crate) fn parse(input: &str, max_targets: usize) -> Result<Request<'_>, Refused> {
    let fields: Fields<'_> = object_str(input).map_err(|error| Refused { id: None, error })?;
    let id = fields
        .id
        .map(request_id)
        .transpose()
        .map_err(|error| Refused { id: None, error })?;
    let refused = |error| Refused { id, error };
    let kind = fields.kind.ok_or_else(|| {
        refused(RequestError::new(
            "missing_type",
            format!("`type` is missing: every switchboard.v1 frame has one of {TYPES}"),
        ))
    })?;
    let kind: Cow<'_, str> = serde_json::from_str(kind.get()).map_err(|_| {
        refused(RequestError::new(
            "invalid_type",
            format!("`type` must be a string: {TYPES}"),
        ))
    })?;
    let kind = match kind.as_ref() {
        "hello" => Kind::Hello {
            resume: fields
                .resume
                .map(resume_point)
                .transpose()
                .map_err(refused)?,
        },
        "send" => Kind::Send {
            mid: fields.mid.map(message_id).transpose().map_err(refused)?,
            targets: parse_targets(fields.targets, max_targets).map_err(refused)?,
            payload: require_payload(fields.payload).map_err(refused)?,
        },
        "publish" => Kind::Publish {
            topic: parse_topic(fields.topic).map_err(refused)?,
            payload: require_payload(fields.payload).map_err(refused)?,
        },
        "subscribe" => Kind::Subscribe {
            topic: parse_topic(fields.topic).map_err(refused)?,
            presence: presence_mode(fields.presence, true).map_err(refused)?,
            meta: fields.meta.map(meta).transpose().map_err(refused)?,
        },
        "presence_get" => Kind::PresenceGet {
            topic: parse_topic(fields.topic).map_err(refused)?,
            mode: presence_mode(fields.presence, false)
                .map_err(refused)?
                .unwrap_or(PresenceMode::Full),
        },
        "unsubscribe" => Kind::Unsubscribe(parse_topic(fields.topic).map_err(refused)?),
        "replay" => {
            let from = seq_field(fields.from, "from").map_err(refused)?;
            let to = seq_field(fields.to, "to").map_err(refused)?;
            if from == 0 || to < from {
                return Err(refused(RequestError::new(
                    "invalid_range",
                    format!(
                        "replay range {from}..{to} is empty: `from` must be at least 1 and `to` at least `from`"
                    ),
                )));
            }
            Kind::Replay { from, to }
        }
        "refresh" => Kind::Refresh {
            token: string_field(fields.token, "token").map_err(refused)?,
        },
        other => {
            return Err(refused(RequestError::new(
                "unknown_type",
                format!(
                    "unknown `type` {:?}: use {TYPES}",
                    other.chars().take(40).collect::<String>()
                ),
            )));
        }
    };
    Ok(Request { id, kind })
}

/// `presence`: `"full"`, `"count"`, or (on a subscribe, where absent means
/// the same) `"none"`.
fn presence_mode(
    raw: Option<&RawValue>,
    none_allowed: bool,
) -> Result<Option<PresenceMode>, RequestError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match serde_json::from_str::<Cow<'_, str>>(raw.get()).as_deref() {
        Ok("full") => Ok(Some(PresenceMode::Full)),
        Ok("count") => Ok(Some(PresenceMode::Count)),
        Ok("none") if none_allowed => Ok(None),
        _ => Err(RequestError::new(
            "invalid_presence",
            format!(
                "`presence` must be {}; got {}",
                if none_allowed {
                    "\"full\", \"count\" or \"none\""
                } else {
                    "\"full\" or \"count\""
                },
                raw.get().chars().take(40).collect::<String>()
            ),
        )),
    }
}

/// `meta`: any JSON value of at most [`MAX_META_BYTES`] bytes as sent.
fn meta(raw: &RawValue) -> Result<&RawValue, RequestError> {
    if raw.get().len() > MAX_META_BYTES {
        return Err(RequestError::new(
            "presence_meta_too_large",
            format!(
                "`meta` is {} bytes of JSON; presence meta is at most {MAX_META_BYTES} bytes: send less (a name and an avatar URL, not a profile)",
                raw.get().len()
            ),
        ));
    }
    Ok(raw)
}

fn request_id(raw: &RawValue) -> Result<u64, RequestError> {
    serde_json::from_str::<u64>(raw.get())
        .ok()
        .filter(|&id| id <= MAX_REQUEST_ID)
        .ok_or_else(|| {
            RequestError::new(
                "invalid_request_id",
                format!(
                    "`id` must be an integer from 0 to {MAX_REQUEST_ID}; got {}",
                    raw.get().chars().take(40).collect::<String>()
                ),
            )
        })
}

fn message_id<'a>(raw: &'a RawValue) -> Result<Cow<'a, str>, RequestError> {
    let mid: Cow<'a, str> = serde_json::from_str(raw.get()).map_err(|_| invalid_mid())?;
    let ok = (1..=MAX_MID_LEN).contains(&mid.len()) && mid.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(invalid_mid());
    }
    Ok(mid)
}

fn invalid_mid() -> RequestError {
    RequestError::new(
        "invalid_mid",
        format!("`mid` must be a string of 1 to {MAX_MID_LEN} printable ASCII characters"),
    )
}

fn resume_point(raw: &RawValue) -> Result<ResumePoint, RequestError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resume {
        epoch: String,
        seq: u64,
    }
    let resume: Resume = serde_json::from_str(raw.get()).map_err(|err| {
        RequestError::new(
            "invalid_resume",
            format!(
                "`resume` must be {{\"epoch\":<string from welcome>,\"seq\":<integer>}}: {err}"
            ),
        )
    })?;
    if resume.epoch.len() > 64 {
        return Err(RequestError::new(
            "invalid_resume",
            "`resume.epoch` is longer than any epoch this server gives out (64 characters)",
        ));
    }
    Ok(ResumePoint {
        epoch: resume.epoch,
        seq: resume.seq,
    })
}

fn seq_field(raw: Option<&RawValue>, name: &str) -> Result<u64, RequestError> {
    let raw = raw.ok_or_else(|| {
        RequestError::new(
            "missing_range",
            format!("`{name}` is missing: a replay names `from` and `to` (inbox seqs)"),
        )
    })?;
    serde_json::from_str(raw.get()).map_err(|_| {
        RequestError::new(
            "invalid_range",
            format!("`{name}` must be a non-negative integer (an inbox seq)"),
        )
    })
}

fn string_field<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, RequestError> {
    let raw = raw.ok_or_else(|| {
        RequestError::new(
            "missing_token",
            format!("`{name}` is missing: send the new token"),
        )
    })?;
    serde_json::from_str(raw.get())
        .map_err(|_| RequestError::new("invalid_token", format!("`{name}` must be a string")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(input: &str) -> (Option<u64>, &'static str) {
        let refused = parse(input, 10).expect_err(input);
        (refused.id, refused.error.code)
    }

    #[test]
    fn parses_each_request() {
        let hello = parse(
            r#"{"type":"hello","id":1,"resume":{"epoch":"e","seq":7}}"#,
            10,
        )
        .expect("hello");
        assert_eq!(hello.id, Some(1));
        assert!(matches!(
            hello.kind,
            Kind::Hello {
                resume: Some(ResumePoint { seq: 7, .. })
            }
        ));
        let send = parse(
            r#"{"type":"send","id":2,"mid":"m-1","targets":[1,"a"],"payload":{"x":1}}"#,
            10,
        )
        .expect("send");
        let Kind::Send {
            mid,
            targets,
            payload,
        } = send.kind
        else {
            panic!("not a send");
        };
        assert_eq!(mid.as_deref(), Some("m-1"));
        assert_eq!(targets.ids.len(), 2);
        assert_eq!(payload.get(), r#"{"x":1}"#);
        assert!(matches!(
            parse(r#"{"type":"replay","from":3,"to":9}"#, 10)
                .expect("replay")
                .kind,
            Kind::Replay { from: 3, to: 9 }
        ));
        assert!(matches!(
            parse(r#"{"type":"subscribe","topic":"t"}"#, 10)
                .expect("sub")
                .kind,
            Kind::Subscribe { presence: None, .. }
        ));
        assert!(matches!(
            parse(
                r#"{"type":"subscribe","topic":"t","presence":"count","meta":{"n":1}}"#,
                10
            )
            .expect("sub")
            .kind,
            Kind::Subscribe {
                presence: Some(PresenceMode::Count),
                meta: Some(_),
                ..
            }
        ));
        assert!(matches!(
            parse(r#"{"type":"presence_get","topic":"t"}"#, 10)
                .expect("presence_get")
                .kind,
            Kind::PresenceGet {
                mode: PresenceMode::Full,
                ..
            }
        ));
    }

    #[test]
    fn errors_keep_the_request_id_when_it_was_readable() {
        assert_eq!(
            code(r#"{"type":"send","id":5,"payload":1}"#),
            (Some(5), "missing_targets")
        );
        assert_eq!(
            code(r#"{"type":"dance","id":6}"#),
            (Some(6), "unknown_type")
        );
        assert_eq!(code(r#"{"id":7}"#), (Some(7), "missing_type"));
        assert_eq!(
            code(r#"{"type":"send","id":-1}"#),
            (None, "invalid_request_id")
        );
        assert_eq!(
            code(r#"{"type":"send","id":9007199254740992}"#),
            (None, "invalid_request_id")
        );
        assert_eq!(code("[1]"), (None, "not_an_object"));
        assert_eq!(
            code(r#"{"type":"send","id":1,"mid":"","targets":[1],"payload":1}"#),
            (Some(1), "invalid_mid")
        );
        assert_eq!(
            code(r#"{"type":"hello","id":1,"resume":{"seq":1}}"#),
            (Some(1), "invalid_resume")
        );
        assert_eq!(
            code(r#"{"type":"replay","id":2,"from":5,"to":4}"#),
            (Some(2), "invalid_range")
        );
        assert_eq!(
            code(r#"{"type":"refresh","id":3}"#),
            (Some(3), "missing_token")
        );
        assert_eq!(
            code(r#"{"type":"subscribe","id":4,"topic":"t","presence":"all"}"#),
            (Some(4), "invalid_presence")
        );
        assert_eq!(
            code(r#"{"type":"presence_get","id":5,"topic":"t","presence":"none"}"#),
            (Some(5), "invalid_presence")
        );
        let big = format!(
            r#"{{"type":"subscribe","id":6,"topic":"t","meta":"{}"}}"#,
            "x".repeat(MAX_META_BYTES)
        );
        assert_eq!(code(&big), (Some(6), "presence_meta_too_large"));
    }
}
