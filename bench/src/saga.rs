//! The benchmark saga and its participants.

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};
use sagas::{Command, Registry, SagaDefinition};
use serde::{Deserialize, Serialize};

/// The saga's input: its number, and whether shipping refuses it (`fail20`: n % 5 == 0).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Input {
    /// The saga's number in the run.
    pub n: u64,
    /// Shipping refuses it.
    pub fail: bool,
}

macro_rules! command {
    ($ty:ident, $name:literal, $participant:literal) => {
        #[doc = concat!("`", $name, "`.")]
        #[derive(Clone, Debug, Serialize, Deserialize)]
        pub struct $ty {
            /// The saga's number.
            pub n: u64,
            /// Refuse it (only `ship_order` looks).
            #[serde(default)]
            pub fail: bool,
        }
        impl Command for $ty {
            const NAME: &'static str = $name;
            const PARTICIPANT: &'static str = $participant;
            type Reply = ();
        }
    };
}

command!(ReserveInventory, "bench.reserve_inventory", "inventory");
command!(ReleaseInventory, "bench.release_inventory", "inventory");
command!(ChargePayment, "bench.charge_payment", "payment");
command!(RefundPayment, "bench.refund_payment", "payment");
command!(ShipOrder, "bench.ship_order", "shipping");

/// The definition name.
pub const NAME: &str = "order_saga_3";

/// `order_saga_3` version 1.
pub fn definition() -> sagas::Result<SagaDefinition<Input>> {
    SagaDefinition::<Input>::builder(NAME, 1)
        .step("reserve_inventory", |s| {
            s.invoke(|i: &Input| ReserveInventory { n: i.n, fail: false }).compensate(|i: &Input| ReleaseInventory { n: i.n, fail: false })
        })
        .step("charge_payment", |s| {
            s.invoke(|i: &Input| ChargePayment { n: i.n, fail: false }).compensate(|i: &Input| RefundPayment { n: i.n, fail: false })
        })
        .step("ship_order", |s| s.invoke(|i: &Input| ShipOrder { n: i.n, fail: i.fail }))
        .build()
}

/// A registry with the benchmark saga.
pub fn registry() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    r.register(definition()?.erased())?;
    Ok(r)
}

/// A participant that does no business work: the SDK records the call in its inbox (keyed by
/// saga, step and kind, in the participant's transaction) and replies.
pub struct Recorder;

macro_rules! record {
    ($ty:ident) => {
        impl Handler<$ty> for Recorder {
            async fn handle(&self, _cx: &mut Context<'_>, cmd: $ty) -> HandlerResult<()> {
                if cmd.fail {
                    return Err(HandlerError::reject("refused", format!("saga {} is refused", cmd.n)));
                }
                Ok(())
            }
        }
    };
}

record!(ReserveInventory);
record!(ReleaseInventory);
record!(ChargePayment);
record!(RefundPayment);
record!(ShipOrder);

/// The participant called `name`.
pub fn participant(name: &str, config: ParticipantConfig) -> anyhow::Result<Participant> {
    let b = Participant::builder(name).config(config);
    let b = match name {
        "inventory" => b.handle::<ReserveInventory>(Recorder).compensate::<ReleaseInventory>(Recorder),
        "payment" => b.handle::<ChargePayment>(Recorder).compensate::<RefundPayment>(Recorder),
        "shipping" => b.handle::<ShipOrder>(Recorder),
        other => anyhow::bail!("no participant `{other}` (inventory, payment, shipping)"),
    };
    Ok(b.build()?)
}

/// The participant names.
pub const PARTICIPANTS: [&str; 3] = ["inventory", "payment", "shipping"];
