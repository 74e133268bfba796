//! Messages as a client, a participant or an attacker sends them by hand, and what a queue holds.

use sagas::protocol::{InboundCommand, SagaRef, TYPE_START, WireMessage};
use sagas::{CommandKind, MessageId, SagaId, StepIndex};

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

/// The `payment.charge` command of step `step` of order saga `saga`, as the payment participant
/// received it (attempt 1, a fresh id), for suites that build replies to it by hand.
pub fn charge_command(saga: SagaId, step: u32, reply_to: &str) -> InboundCommand {
    InboundCommand {
        message_id: MessageId::new_random(),
        command: "payment.charge".into(),
        saga: SagaRef { saga_id: saga, definition: "order_fulfilment".into(), version: 1 },
        step: StepIndex(step),
        step_name: "charge_payment".into(),
        kind: CommandKind::Invoke,
        attempt: 1,
        reply_to: reply_to.into(),
        traceparent: None,
        body: serde_json::json!({}),
        heartbeat_ms: None,
        progress: None,
    }
}
