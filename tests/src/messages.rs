//! Messages as a client, a participant or an attacker sends them by hand, and what a queue holds.

use sagas::MessageId;
use sagas::protocol::{TYPE_START, WireMessage};

/// A start message (`sagaflow.start`) with `body` as it is, valid or not, and a fresh id.
pub fn start_message(body: &[u8]) -> WireMessage {
    WireMessage {
        message_id: Some(MessageId::new_random().to_string()),
        kind: Some(TYPE_START.into()),
        content_type: Some("application/json".into()),
        body: body.to_vec(),
        ..WireMessage::default()
    }
}

/// How many messages `queue` holds (ready, not yet delivered).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    Ok(ch.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await?.message_count())
}
