//! Any message, as a broker could deliver it, through every decoder: none panics, and what a
//! decoder accepts is what PostgreSQL and RabbitMQ can carry (no U+0000 in what is kept, protocol
//! headers within their limit, a trace context only when valid, keys and names within theirs),
//! and a refusal's text never repeats a large value whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagas::protocol::{
    HeaderValue, InboundReplyOrHeartbeat, MAX_HEADER_BYTES, MAX_HEARTBEAT_BYTES, MAX_IDEMPOTENCY_KEY_BYTES, MAX_NAME_BYTES,
    PROTOCOL_HEADERS, WireMessage, decode_command, decode_event, decode_reply, decode_reply_or_heartbeat, decode_start, json_has_nul,
    valid_traceparent,
};

const TYPES: [&str; 6] = ["sagaflow.reply", "sagaflow.start", "sagaflow.event", "sagaflow.heartbeat", "payment.charge", ""];

/// Cut `data` into fields at 0xFF bytes: the first ones choose the properties and headers, the
/// last is the body.
fn message(data: &[u8]) -> WireMessage {
    let mut parts = data.split(|&b| b == 0xff);
    let mut text = |max: usize| parts.next().map(|p| String::from_utf8_lossy(&p[..p.len().min(max)]).into_owned());
    let mut m = WireMessage {
        message_id: text(255),
        correlation_id: text(255),
        kind: text(255).map(|t| match t.as_bytes().first() {
            Some(b) if (*b as usize) < TYPES.len() => TYPES[*b as usize].to_owned(),
            _ => t,
        }),
        reply_to: text(255),
        ..WireMessage::default()
    };
    // The protocol's headers, and one it does not read.
    for name in PROTOCOL_HEADERS.into_iter().chain(["x-other"]) {
        if let Some(v) = text(usize::MAX) {
            let value = match v.parse::<i64>() {
                Ok(n) if v.len() < 4 => HeaderValue::Int(n),
                _ => HeaderValue::Str(v),
            };
            m.headers.insert(name.to_owned(), value);
        }
    }
    m.body = parts.next().map(<[u8]>::to_vec).unwrap_or_default();
    m
}

fn clean(s: &str) -> bool {
    !s.contains('\0')
}

fuzz_target!(|data: &[u8]| {
    let m = message(data);
    let max = 64 * 1024;
    let refusal =
        |e: &sagas::protocol::ProtocolError| assert!(e.to_string().len() < 2048, "a refusal quotes little: {}", e.to_string().len());
    match decode_command(&m, max) {
        Ok(c) => {
            assert!(clean(&c.command) && clean(&c.reply_to) && clean(&c.step_name) && clean(&c.saga.definition));
            assert!(c.step_name.len() <= MAX_HEADER_BYTES && c.saga.definition.len() <= MAX_HEADER_BYTES);
            assert!(c.traceparent.as_deref().is_none_or(valid_traceparent));
            assert!(!json_has_nul(c.body.to_string().as_bytes()));
            assert!(c.progress.as_ref().is_none_or(|p| !json_has_nul(p.to_string().as_bytes())));
        }
        Err(e) => refusal(&e),
    }
    match decode_reply(&m, max) {
        Ok(r) => {
            assert!(r.traceparent.as_deref().is_none_or(valid_traceparent));
            assert!(!json_has_nul(serde_json::to_string(&r.reply.outcome).unwrap().as_bytes()));
        }
        Err(e) => refusal(&e),
    }
    match decode_reply_or_heartbeat(&m, max) {
        Ok(InboundReplyOrHeartbeat::Heartbeat(_, h)) => {
            let details = h.details.to_string();
            assert!(details.len() <= MAX_HEARTBEAT_BYTES && !json_has_nul(details.as_bytes()), "details fit the header they go into");
        }
        Ok(InboundReplyOrHeartbeat::Reply(_)) => {}
        Err(e) => refusal(&e),
    }
    match decode_start(&m, max) {
        Ok(s) => {
            assert!(!s.definition.is_empty() && s.definition.len() <= MAX_NAME_BYTES && clean(&s.definition));
            assert!(s.idempotency_key.as_deref().is_none_or(|k| k.len() <= MAX_IDEMPOTENCY_KEY_BYTES && clean(k) && !k.is_empty()));
            assert!(!json_has_nul(s.input.to_string().as_bytes()));
        }
        Err(e) => refusal(&e),
    }
    match decode_event(&m, max) {
        Ok(ev) => {
            assert!(!ev.event.is_empty() && ev.event.len() <= MAX_NAME_BYTES && clean(&ev.event));
            assert!(!json_has_nul(ev.payload.to_string().as_bytes()));
        }
        Err(e) => refusal(&e),
    }
});
