//! The commands of the order saga. `NAME` is the wire name, `PARTICIPANT` the queue it goes to.

use sagas::Command;
use serde::{Deserialize, Serialize};

/// Reserve `quantity` units of `sku` for an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReserveStock {
    /// The order.
    pub order_id: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: i64,
}
/// The reservation made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StockReserved {
    /// Its id.
    pub reservation_id: String,
}
impl Command for ReserveStock {
    const NAME: &'static str = "inventory.reserve_stock";
    const PARTICIPANT: &'static str = "inventory";
    type Reply = StockReserved;
}

/// Give an order's reserved stock back (compensation of [`ReserveStock`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseStock {
    /// The order.
    pub order_id: String,
}
impl Command for ReleaseStock {
    const NAME: &'static str = "inventory.release_stock";
    const PARTICIPANT: &'static str = "inventory";
    type Reply = ();
}

/// Charge an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChargePayment {
    /// The order.
    pub order_id: String,
    /// How much.
    pub amount_cents: i64,
}
/// The charge made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaymentCharged {
    /// Its id.
    pub charge_id: String,
}
impl Command for ChargePayment {
    const NAME: &'static str = "payment.charge";
    const PARTICIPANT: &'static str = "payment";
    type Reply = PaymentCharged;
}

/// Refund an order's charge (compensation of [`ChargePayment`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefundPayment {
    /// The order.
    pub order_id: String,
}
impl Command for RefundPayment {
    const NAME: &'static str = "payment.refund";
    const PARTICIPANT: &'static str = "payment";
    type Reply = ();
}

/// Ship an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShipOrder {
    /// The order.
    pub order_id: String,
    /// Where to.
    pub destination: String,
    /// Fail transiently for this many attempts first (for demos and tests).
    #[serde(default)]
    pub flaky_attempts: u32,
}
/// The shipment made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderShipped {
    /// Its id.
    pub shipment_id: String,
}
impl Command for ShipOrder {
    const NAME: &'static str = "shipping.ship";
    const PARTICIPANT: &'static str = "shipping";
    type Reply = OrderShipped;
}
