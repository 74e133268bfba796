//! The wire protocol, language-neutral and documented in `docs/protocol.md`.
//!
//! Messages are AMQP 0-9-1 messages with JSON bodies. This module describes them without
//! depending on an AMQP client: [`WireMessage`] is the properties, headers and body a client
//! sends or receives; `encode_*` build them and `decode_*` validate them, returning a
//! [`ProtocolError`] whose [`code`](ProtocolError::code) becomes the dead-letter reason.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decide::{Heartbeat, OutgoingCommand, Reply, SagaEvent};
use crate::ids::{CommandKind, MessageId, SagaId, StepIndex, Timestamp};
use crate::state::ParentLink;

/// Header: the saga's id (string, UUID).
pub const H_SAGA_ID: &str = "x-saga-id";
/// Header: the definition's name.
pub const H_DEFINITION: &str = "x-saga-definition";
/// Header: the definition's version (integer).
pub const H_VERSION: &str = "x-saga-version";
/// Header: the step's index (integer).
pub const H_STEP: &str = "x-saga-step";
/// Header: the step's name.
pub const H_STEP_NAME: &str = "x-saga-step-name";
/// Header: `invoke` or `compensate`.
pub const H_KIND: &str = "x-saga-kind";
/// Header: the attempt (integer, from 1).
pub const H_ATTEMPT: &str = "x-saga-attempt";
/// Header: W3C trace context.
pub const H_TRACEPARENT: &str = "traceparent";
/// Header on dead-lettered messages: the stable reason code.
pub const H_DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
/// Header on dead-lettered messages: the reason in words.
pub const H_DEAD_LETTER_DETAIL: &str = "x-dead-letter-detail";
/// Header on start messages: the idempotency key.
pub const H_IDEMPOTENCY_KEY: &str = "x-idempotency-key";
/// Header on commands of a step with a heartbeat timeout: the timeout, in ms (integer).
pub const H_HEARTBEAT_MS: &str = "x-saga-heartbeat-ms";
/// Header on commands: the details of an earlier attempt's last heartbeat (JSON text).
pub const H_PROGRESS: &str = "x-saga-progress";

/// AMQP `type` of replies.
pub const TYPE_REPLY: &str = "sagaflow.reply";
/// AMQP `type` of heartbeats (a participant working on a command reports that it is alive).
pub const TYPE_HEARTBEAT: &str = "sagaflow.heartbeat";
/// AMQP `type` of start requests.
pub const TYPE_START: &str = "sagaflow.start";
/// AMQP `type` of external events delivered to a saga.
pub const TYPE_EVENT: &str = "sagaflow.event";
/// AMQP `type` prefix of lifecycle events (`sagaflow.lifecycle.step_completed`).
pub const TYPE_LIFECYCLE_PREFIX: &str = "sagaflow.lifecycle.";
/// Content type of every body.
pub const CONTENT_TYPE: &str = "application/json";
/// Default largest accepted body, in bytes (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest heartbeat body accepted, in bytes: its details are kept in the saga's state and
/// carried by the next attempt's command in a header.
pub const MAX_HEARTBEAT_BYTES: usize = 4096;
/// Longest idempotency key accepted, in bytes: PostgreSQL indexes it, and a b-tree entry holds
/// about 2.7 kB at most.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;
/// Longest definition or event name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest value of a protocol header (`x-saga-*`, `traceparent`, `x-idempotency-key`)
/// accepted on an inbound message, in bytes.
pub const MAX_HEADER_BYTES: usize = 4096;
/// How many characters of a refused value an error message quotes.
const QUOTE_CHARS: usize = 80;

/// The protocol's headers: the ones a decoder reads, checked for size and U+0000.
pub const PROTOCOL_HEADERS: [&str; 11] = [
    H_SAGA_ID,
    H_DEFINITION,
    H_VERSION,
    H_STEP,
    H_STEP_NAME,
    H_KIND,
    H_ATTEMPT,
    H_TRACEPARENT,
    H_IDEMPOTENCY_KEY,
    H_HEARTBEAT_MS,
    H_PROGRESS,
];

/// `s` quoted for an error message: at most 80 characters, control characters
/// escaped, and the full size when it was cut. A refusal never repeats a large value whole.
pub fn quote(s: &str) -> String {
    let shown: String = s.chars().take(QUOTE_CHARS).flat_map(char::escape_debug).collect();
    if s.chars().nth(QUOTE_CHARS).is_some() { format!("`{shown}`… ({} bytes)", s.len()) } else { format!("`{shown}`") }
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when it was cut.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// Whether JSON text `body` holds U+0000 in a string (`\u0000`), which PostgreSQL's `jsonb`
/// and `text` cannot store. Raw NUL bytes are not valid JSON and fail to parse anyway.
pub fn json_has_nul(body: &[u8]) -> bool {
    let needle = b"\\u0000";
    let mut from = 0;
    while let Some(at) = body[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from) {
        // `\\u0000` is an escaped backslash followed by text: count the backslashes before.
        let backslashes = body[..=at].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 1 {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Whether `s` is a W3C trace context this protocol carries: version `00`, 32 and 16 lowercase
/// hex digits that are not all zero, and 2 of flags (55 characters). Anything else is dropped
/// and a new trace started, as the W3C recommendation says of a malformed `traceparent`.
pub fn valid_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |p: &[u8]| p.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let nonzero = |p: &[u8]| p.iter().any(|&b| b != b'0');
    // `00-` 32 hex `-` 16 hex `-` 2 hex: checked by position, as it runs for every decision.
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && nonzero(&b[3..35])
        && hex(&b[36..52])
        && nonzero(&b[36..52])
        && hex(&b[53..])
}

/// A string of the protocol refused when it is empty, longer than `max` bytes or holds U+0000.
fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("`{what}` must not be empty"));
    }
    check_storable(what, s, max)
}

/// A string refused when it is longer than `max` bytes or holds U+0000.
fn check_storable(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("`{what}` is {} bytes, over the limit of {max}: {}", s.len(), quote(s)));
    }
    if s.contains('\0') {
        return Err(format!("`{what}` contains U+0000, which PostgreSQL cannot store: {}", quote(s)));
    }
    Ok(())
}

/// A header value: the protocol only uses strings and integers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    /// An integer (AMQP long-long).
    Int(i64),
    /// A string (AMQP long string).
    Str(String),
}

/// An AMQP message as the protocol sees it.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct WireMessage {
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `correlation_id`.
    pub correlation_id: Option<String>,
    /// AMQP `type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// AMQP `reply_to`.
    pub reply_to: Option<String>,
    /// AMQP `content_type`.
    pub content_type: Option<String>,
    /// AMQP `timestamp` (seconds since the epoch).
    pub timestamp: Option<u64>,
    /// AMQP `priority` (commands: their saga's priority, 0–9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Application headers.
    pub headers: BTreeMap<String, HeaderValue>,
    /// The body.
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl WireMessage {
    fn header_str(&self, name: &'static str) -> Result<&str, ProtocolError> {
        match self.headers.get(name) {
            Some(HeaderValue::Str(s)) => Ok(s),
            Some(HeaderValue::Int(_)) => Err(ProtocolError::InvalidHeader { header: name, detail: "expected a string".into() }),
            None => Err(ProtocolError::MissingHeader(name)),
        }
    }

    fn header_u32(&self, name: &'static str) -> Result<u32, ProtocolError> {
        let invalid = |detail: String| ProtocolError::InvalidHeader { header: name, detail };
        match self.headers.get(name) {
            Some(HeaderValue::Int(n)) => u32::try_from(*n).map_err(|_| invalid(format!("{n} is out of range"))),
            // Some clients can only send string headers; accept digits.
            Some(HeaderValue::Str(s)) => s.parse().map_err(|_| invalid(format!("{} is not a non-negative integer", quote(s)))),
            None => Err(ProtocolError::MissingHeader(name)),
        }
    }

    fn header_opt(&self, name: &str) -> Option<&str> {
        match self.headers.get(name) {
            Some(HeaderValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn uuid_prop(value: Option<&str>, what: &'static str) -> Result<uuid::Uuid, ProtocolError> {
        let v = value.ok_or(ProtocolError::MissingProperty(what))?;
        uuid::Uuid::parse_str(v)
            .map_err(|e| ProtocolError::InvalidProperty { property: what, detail: format!("{} is not a UUID: {e}", quote(v)) })
    }

    /// What a reply and a heartbeat say of the command they answer: the saga, the command's
    /// id (`correlation_id`), the step, the kind and the attempt.
    fn answer_headers(&self) -> Result<(SagaId, MessageId, StepIndex, CommandKind, u32), ProtocolError> {
        let in_reply_to = MessageId(WireMessage::uuid_prop(self.correlation_id.as_deref(), "correlation_id")?);
        let saga_id = self.header_str(H_SAGA_ID)?;
        let saga_id = saga_id
            .parse::<SagaId>()
            .map_err(|e| ProtocolError::InvalidHeader { header: H_SAGA_ID, detail: format!("{} is not a UUID: {e}", quote(saga_id)) })?;
        let kind =
            self.header_str(H_KIND)?.parse::<CommandKind>().map_err(|detail| ProtocolError::InvalidHeader { header: H_KIND, detail })?;
        Ok((saga_id, in_reply_to, StepIndex(self.header_u32(H_STEP)?), kind, self.header_u32(H_ATTEMPT)?))
    }

    /// The checks every decoder makes first: the body's size, then the protocol headers and the
    /// properties a decoder keeps (no value over [`MAX_HEADER_BYTES`], none holding U+0000).
    fn check_envelope(&self, max: usize) -> Result<(), ProtocolError> {
        if self.body.len() > max {
            return Err(ProtocolError::Oversized { size: self.body.len(), max });
        }
        for name in PROTOCOL_HEADERS {
            if let Some(HeaderValue::Str(v)) = self.headers.get(name) {
                check_storable(name, v, MAX_HEADER_BYTES).map_err(|detail| ProtocolError::InvalidHeader { header: name, detail })?;
            }
        }
        for (property, v) in [("type", &self.kind), ("reply_to", &self.reply_to)] {
            if v.as_deref().is_some_and(|v| v.contains('\0')) {
                let detail = "contains U+0000, which PostgreSQL cannot store".to_owned();
                return Err(ProtocolError::InvalidProperty { property, detail });
            }
        }
        Ok(())
    }

    /// The body as JSON: refused when it does not parse as `T` or holds U+0000 in a string.
    fn json_body<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        if json_has_nul(&self.body) {
            return Err(ProtocolError::MalformedBody("a string contains U+0000, which PostgreSQL cannot store".into()));
        }
        serde_json::from_slice(&self.body).map_err(|e| ProtocolError::MalformedBody(clip(&e.to_string(), 512).into_owned()))
    }

    /// The `traceparent` header when it is a valid W3C trace context ([`valid_traceparent`]).
    fn traceparent(&self) -> Option<String> {
        self.header_opt(H_TRACEPARENT).filter(|t| valid_traceparent(t)).map(str::to_owned)
    }

    /// A JSON view (properties, headers and the body parsed as JSON, or as a string when it is
    /// not JSON), used by the golden files and for showing dead letters.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        let body =
            serde_json::from_slice::<Value>(&self.body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        if let Value::Object(m) = &mut v {
            m.insert("body".into(), body);
        }
        v
    }
}

/// Why an inbound message was refused. The [`code`](Self::code) is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The body is larger than allowed.
    #[error("body of {size} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Body size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The AMQP `type` is not one this consumer handles.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// A required property is missing.
    #[error("missing property `{0}`")]
    MissingProperty(&'static str),
    /// A property has a wrong value.
    #[error("invalid property `{property}`: {detail}")]
    InvalidProperty {
        /// The property.
        property: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A required header is missing.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// A header has a wrong value.
    #[error("invalid header `{header}`: {detail}")]
    InvalidHeader {
        /// The header.
        header: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The body is not the expected JSON.
    #[error("malformed body: {0}")]
    MalformedBody(String),
}

impl ProtocolError {
    /// The stable reason code written in the `x-dead-letter-reason` header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::UnknownType(_) => "unknown_type",
            Self::MissingProperty(_) | Self::InvalidProperty { .. } => "invalid_properties",
            Self::MissingHeader(_) | Self::InvalidHeader { .. } => "invalid_headers",
            Self::MalformedBody(_) => "malformed_body",
        }
    }
}

/// The outcome a participant reports; the body of a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// The command ran; `output` is its result (`null` when it has none).
    Success {
        /// The result.
        #[serde(default)]
        output: Value,
    },
    /// A business refusal: nothing changed, and the saga compensates.
    Rejected {
        /// A stable code of the participant's (`out_of_stock`).
        code: String,
        /// In words.
        #[serde(default)]
        message: String,
    },
    /// Something went wrong that may pass (a database down): nothing changed, the saga retries
    /// under the step's policy.
    TransientFailure {
        /// In words.
        #[serde(default)]
        message: String,
    },
}

/// Which definition a command belongs to, for its headers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRef {
    /// The saga's id.
    pub saga_id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
}

/// Build the message for a command `decide` produced.
pub fn encode_command(saga: &SagaRef, cmd: &OutgoingCommand, reply_to: &str, traceparent: Option<&str>, now: Timestamp) -> WireMessage {
    let mut headers = BTreeMap::new();
    headers.insert(H_SAGA_ID.to_owned(), HeaderValue::Str(saga.saga_id.to_string()));
    headers.insert(H_DEFINITION.to_owned(), HeaderValue::Str(saga.definition.clone()));
    headers.insert(H_VERSION.to_owned(), HeaderValue::Int(i64::from(saga.version)));
    headers.insert(H_STEP.to_owned(), HeaderValue::Int(i64::from(cmd.step.0)));
    headers.insert(H_STEP_NAME.to_owned(), HeaderValue::Str(cmd.step_name.clone()));
    headers.insert(H_KIND.to_owned(), HeaderValue::Str(cmd.kind.as_str().to_owned()));
    headers.insert(H_ATTEMPT.to_owned(), HeaderValue::Int(i64::from(cmd.attempt)));
    if let Some(tp) = traceparent {
        headers.insert(H_TRACEPARENT.to_owned(), HeaderValue::Str(tp.to_owned()));
    }
    if let Some(ms) = cmd.heartbeat_ms {
        headers.insert(H_HEARTBEAT_MS.to_owned(), HeaderValue::Int(i64::try_from(ms).unwrap_or(i64::MAX)));
    }
    if let Some(p) = &cmd.progress {
        headers.insert(H_PROGRESS.to_owned(), HeaderValue::Str(p.to_string()));
    }
    WireMessage {
        message_id: Some(cmd.message_id.to_string()),
        correlation_id: Some(saga.saga_id.to_string()),
        kind: Some(cmd.command.clone()),
        reply_to: Some(reply_to.to_owned()),
        content_type: Some(CONTENT_TYPE.to_owned()),
        timestamp: Some(now.0 / 1000),
        priority: None,
        headers,
        body: serde_json::to_vec(&cmd.body).unwrap_or_default(),
    }
}

/// A command as a participant receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundCommand {
    /// The command's id (the dedupe key).
    pub message_id: MessageId,
    /// The command's wire name.
    pub command: String,
    /// The saga.
    pub saga: SagaRef,
    /// The step.
    pub step: StepIndex,
    /// The step's name.
    pub step_name: String,
    /// Command or compensation.
    pub kind: CommandKind,
    /// The attempt.
    pub attempt: u32,
    /// Where the reply goes (a queue name: the reply is published to the default exchange with this routing key).
    pub reply_to: String,
    /// Trace context, if any.
    pub traceparent: Option<String>,
    /// The JSON body.
    pub body: Value,
    /// The step's heartbeat timeout (ms), when it has one: send heartbeats well within it.
    pub heartbeat_ms: Option<u64>,
    /// What an earlier attempt reported in its last heartbeat, to carry on from.
    pub progress: Option<Value>,
}

/// Validate a command message (what a participant does before running a handler).
pub fn decode_command(msg: &WireMessage, max_body: usize) -> Result<InboundCommand, ProtocolError> {
    msg.check_envelope(max_body)?;
    let message_id = MessageId(WireMessage::uuid_prop(msg.message_id.as_deref(), "message_id")?);
    let command = msg.kind.clone().filter(|k| !k.is_empty()).ok_or(ProtocolError::MissingProperty("type"))?;
    let reply_to = msg.reply_to.clone().filter(|r| !r.is_empty()).ok_or(ProtocolError::MissingProperty("reply_to"))?;
    let saga_id = msg.header_str(H_SAGA_ID)?;
    let saga_id = saga_id
        .parse::<SagaId>()
        .map_err(|e| ProtocolError::InvalidHeader { header: H_SAGA_ID, detail: format!("{} is not a UUID: {e}", quote(saga_id)) })?;
    let kind = msg.header_str(H_KIND)?.parse::<CommandKind>().map_err(|detail| ProtocolError::InvalidHeader { header: H_KIND, detail })?;
    Ok(InboundCommand {
        message_id,
        command,
        saga: SagaRef { saga_id, definition: msg.header_str(H_DEFINITION)?.to_owned(), version: msg.header_u32(H_VERSION)? },
        step: StepIndex(msg.header_u32(H_STEP)?),
        step_name: msg.header_str(H_STEP_NAME)?.to_owned(),
        kind,
        attempt: msg.header_u32(H_ATTEMPT)?,
        reply_to,
        traceparent: msg.traceparent(),
        body: msg.json_body()?,
        heartbeat_ms: match msg.headers.get(H_HEARTBEAT_MS) {
            None => None,
            Some(_) => Some(u64::from(msg.header_u32(H_HEARTBEAT_MS)?)),
        },
        progress: match msg.header_opt(H_PROGRESS) {
            None => None,
            Some(p) => Some(serde_json::from_str(p).map_err(|e| ProtocolError::InvalidHeader {
                header: H_PROGRESS,
                detail: format!("not JSON: {}", clip(&e.to_string(), 200)),
            })?),
        },
    })
}

/// Build a heartbeat with id `message_id` for `cmd`, reporting `details` (any JSON; `null` for
/// none). Give each heartbeat a new id: heartbeats are not deduplicated, the saga keeps the last.
pub fn encode_heartbeat(cmd: &InboundCommand, details: &Value, message_id: MessageId, now: Timestamp) -> WireMessage {
    let mut msg = encode_reply(cmd, &ReplyOutcome::Success { output: Value::Null }, now);
    msg.message_id = Some(message_id.to_string());
    msg.kind = Some(TYPE_HEARTBEAT.to_owned());
    msg.body = serde_json::to_vec(&HeartbeatBody { details: details.clone() }).unwrap_or_default();
    msg
}

/// The body of a heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// What the participant reports of its progress.
    #[serde(default)]
    pub details: Value,
}

/// What arrives on a reply queue: a reply or a heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub enum InboundReplyOrHeartbeat {
    /// A reply.
    Reply(InboundReply),
    /// A heartbeat, for the saga.
    Heartbeat(SagaId, Heartbeat),
}

/// Validate a message from a reply queue: a reply ([`decode_reply`]) or a heartbeat (at most
/// [`MAX_HEARTBEAT_BYTES`], the reply's properties and headers, a [`HeartbeatBody`]).
pub fn decode_reply_or_heartbeat(msg: &WireMessage, max_body: usize) -> Result<InboundReplyOrHeartbeat, ProtocolError> {
    if msg.kind.as_deref() != Some(TYPE_HEARTBEAT) {
        return decode_reply(msg, max_body).map(InboundReplyOrHeartbeat::Reply);
    }
    msg.check_envelope(max_body.min(MAX_HEARTBEAT_BYTES))?;
    WireMessage::uuid_prop(msg.message_id.as_deref(), "message_id")?;
    let (saga_id, in_reply_to, step, kind, attempt) = msg.answer_headers()?;
    let body: HeartbeatBody = msg.json_body()?;
    Ok(InboundReplyOrHeartbeat::Heartbeat(saga_id, Heartbeat { in_reply_to, step, kind, attempt, details: body.details }))
}

/// Build the reply to `cmd`. Its id is [`MessageId::for_reply`] of the command's, so a
/// participant that replies twice sends the same message twice.
pub fn encode_reply(cmd: &InboundCommand, outcome: &ReplyOutcome, now: Timestamp) -> WireMessage {
    let mut headers = BTreeMap::new();
    headers.insert(H_SAGA_ID.to_owned(), HeaderValue::Str(cmd.saga.saga_id.to_string()));
    headers.insert(H_DEFINITION.to_owned(), HeaderValue::Str(cmd.saga.definition.clone()));
    headers.insert(H_VERSION.to_owned(), HeaderValue::Int(i64::from(cmd.saga.version)));
    headers.insert(H_STEP.to_owned(), HeaderValue::Int(i64::from(cmd.step.0)));
    headers.insert(H_STEP_NAME.to_owned(), HeaderValue::Str(cmd.step_name.clone()));
    headers.insert(H_KIND.to_owned(), HeaderValue::Str(cmd.kind.as_str().to_owned()));
    headers.insert(H_ATTEMPT.to_owned(), HeaderValue::Int(i64::from(cmd.attempt)));
    if let Some(tp) = &cmd.traceparent {
        headers.insert(H_TRACEPARENT.to_owned(), HeaderValue::Str(tp.clone()));
    }
    WireMessage {
        message_id: Some(MessageId::for_reply(cmd.message_id).to_string()),
        correlation_id: Some(cmd.message_id.to_string()),
        kind: Some(TYPE_REPLY.to_owned()),
        reply_to: None,
        content_type: Some(CONTENT_TYPE.to_owned()),
        timestamp: Some(now.0 / 1000),
        priority: None,
        headers,
        body: serde_json::to_vec(outcome).unwrap_or_default(),
    }
}

/// The reply of a child saga to attempt `attempt` of the `kind` command of its parent's step
/// (`link`): what a participant would have sent for that command.
pub fn encode_child_reply(link: &ParentLink, kind: CommandKind, attempt: u32, outcome: &ReplyOutcome, now: Timestamp) -> WireMessage {
    let cmd = InboundCommand {
        message_id: MessageId::for_command(link.saga_id, link.step, kind, attempt),
        command: String::new(),
        saga: SagaRef { saga_id: link.saga_id, definition: link.definition.clone(), version: link.version },
        step: link.step,
        step_name: link.step_name.clone(),
        kind,
        attempt,
        reply_to: String::new(),
        traceparent: None,
        body: Value::Null,
        heartbeat_ms: None,
        progress: None,
    };
    encode_reply(&cmd, outcome, now)
}

/// A reply as the orchestrator receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundReply {
    /// The reply's own id (the orchestrator's inbox dedupe key).
    pub message_id: MessageId,
    /// The saga it is for.
    pub saga_id: SagaId,
    /// The reply, ready for `decide`.
    pub reply: Reply,
    /// Trace context, if any.
    pub traceparent: Option<String>,
}

/// Validate a reply message.
pub fn decode_reply(msg: &WireMessage, max_body: usize) -> Result<InboundReply, ProtocolError> {
    msg.check_envelope(max_body)?;
    match msg.kind.as_deref() {
        Some(TYPE_REPLY) => {}
        Some(other) => return Err(ProtocolError::UnknownType(other.to_owned())),
        None => return Err(ProtocolError::MissingProperty("type")),
    }
    let message_id = MessageId(WireMessage::uuid_prop(msg.message_id.as_deref(), "message_id")?);
    let (saga_id, in_reply_to, step, kind, attempt) = msg.answer_headers()?;
    Ok(InboundReply {
        message_id,
        saga_id,
        reply: Reply { in_reply_to, step, kind, attempt, outcome: msg.json_body()? },
        traceparent: msg.traceparent(),
    })
}

/// The body of a start request (AMQP `type` `sagaflow.start`, or `POST /sagas`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Definition name.
    pub definition: String,
    /// Definition version; the newest registered one when absent.
    #[serde(default)]
    pub version: Option<u32>,
    /// The saga's input.
    pub input: Value,
    /// The same key twice starts one saga.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The id to give the saga; a new one when absent.
    #[serde(default)]
    pub saga_id: Option<SagaId>,
    /// The saga's priority (higher first; 0 when absent): its steps waiting for a resource slot
    /// take one before those of sagas with a lower priority.
    #[serde(default)]
    pub priority: Option<i32>,
}

/// Validate a start message.
pub fn decode_start(msg: &WireMessage, max_body: usize) -> Result<StartRequest, ProtocolError> {
    msg.check_envelope(max_body)?;
    match msg.kind.as_deref() {
        Some(TYPE_START) => {}
        Some(other) => return Err(ProtocolError::UnknownType(other.to_owned())),
        None => return Err(ProtocolError::MissingProperty("type")),
    }
    let mut req: StartRequest = msg.json_body()?;
    if req.idempotency_key.is_none() {
        req.idempotency_key = msg.header_opt(H_IDEMPOTENCY_KEY).map(str::to_owned);
    }
    req.check().map_err(ProtocolError::MalformedBody)?;
    Ok(req)
}

impl StartRequest {
    /// What every way of starting a saga checks besides the JSON's shape: a definition name and
    /// an idempotency key that PostgreSQL can store and index ([`MAX_NAME_BYTES`],
    /// [`MAX_IDEMPOTENCY_KEY_BYTES`], no U+0000).
    pub fn check(&self) -> Result<(), String> {
        check_text("definition", &self.definition, MAX_NAME_BYTES)?;
        if let Some(key) = &self.idempotency_key {
            check_text("idempotency_key", key, MAX_IDEMPOTENCY_KEY_BYTES)?;
        }
        Ok(())
    }
}

/// A name (a definition's, an event's) as every path checks it: not empty, at most
/// [`MAX_NAME_BYTES`], no U+0000. `what` names it in the error.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    check_text(what, name, MAX_NAME_BYTES)
}

/// The body of an external event delivered to a saga (AMQP `type` `sagaflow.event`, or
/// `POST /sagas/{id}/events`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventDelivery {
    /// The saga it is for.
    pub saga_id: SagaId,
    /// The event's wire name.
    pub event: String,
    /// What it carries.
    #[serde(default)]
    pub payload: Value,
}

/// Validate an event message.
pub fn decode_event(msg: &WireMessage, max_body: usize) -> Result<EventDelivery, ProtocolError> {
    msg.check_envelope(max_body)?;
    match msg.kind.as_deref() {
        Some(TYPE_EVENT) => {}
        Some(other) => return Err(ProtocolError::UnknownType(other.to_owned())),
        None => return Err(ProtocolError::MissingProperty("type")),
    }
    let ev: EventDelivery = msg.json_body()?;
    check_name("event", &ev.event).map_err(ProtocolError::MalformedBody)?;
    Ok(ev)
}

/// The body of a lifecycle event on the events exchange (routing key
/// `{definition}.{event}`, e.g. `order_fulfilment.completed`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The saga.
    pub saga_id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub event: SagaEvent,
}

/// Build the message of a lifecycle event.
pub fn encode_lifecycle(ev: &LifecycleEvent, message_id: MessageId) -> WireMessage {
    let mut headers = BTreeMap::new();
    headers.insert(H_SAGA_ID.to_owned(), HeaderValue::Str(ev.saga_id.to_string()));
    headers.insert(H_DEFINITION.to_owned(), HeaderValue::Str(ev.definition.clone()));
    headers.insert(H_VERSION.to_owned(), HeaderValue::Int(i64::from(ev.version)));
    WireMessage {
        message_id: Some(message_id.to_string()),
        correlation_id: Some(ev.saga_id.to_string()),
        kind: Some(format!("{TYPE_LIFECYCLE_PREFIX}{}", ev.event.name())),
        reply_to: None,
        content_type: Some(CONTENT_TYPE.to_owned()),
        timestamp: Some(ev.at.0 / 1000),
        priority: None,
        headers,
        body: serde_json::to_vec(ev).unwrap_or_default(),
    }
}
