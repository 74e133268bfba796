//! The order-fulfilment saga.

use std::time::Duration;

use sagas::{RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};

use crate::commands::{ChargePayment, RefundPayment, ReleaseStock, ReserveStock, ShipOrder};

/// The saga's data: its input, and what the steps return.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Order {
    /// The order.
    pub order_id: String,
    /// What is bought.
    pub sku: String,
    /// How many.
    pub quantity: i64,
    /// The price.
    pub amount_cents: i64,
    /// Where it goes.
    pub destination: String,
    /// Shipping fails transiently this many times first.
    #[serde(default)]
    pub flaky_shipping: u32,
    /// Set by `reserve_stock`.
    #[serde(default)]
    pub reservation_id: Option<String>,
    /// Set by `charge_payment`.
    #[serde(default)]
    pub charge_id: Option<String>,
    /// Set by `ship`.
    #[serde(default)]
    pub shipment_id: Option<String>,
}

/// `order_fulfilment` version 1: reserve_stock → charge_payment → ship.
pub fn definition() -> sagas::Result<SagaDefinition<Order>> {
    let quick = RetryPolicy::exponential(Duration::from_millis(50), 2.0, 5).max_delay(Duration::from_secs(2));
    SagaDefinition::<Order>::builder("order_fulfilment", 1)
        // Found by its order in the API, the CLI and the web page.
        .search_key("order_id", |o: &Order| o.order_id.clone())
        .step("reserve_stock", |s| {
            s.invoke(|o: &Order| ReserveStock { order_id: o.order_id.clone(), sku: o.sku.clone(), quantity: o.quantity })
                .on_reply(|o, r| o.reservation_id = Some(r.reservation_id))
                .compensate(|o: &Order| ReleaseStock { order_id: o.order_id.clone() })
                .retry(quick.clone())
        })
        .step("charge_payment", |s| {
            s.invoke(|o: &Order| ChargePayment { order_id: o.order_id.clone(), amount_cents: o.amount_cents })
                .on_reply(|o, r| o.charge_id = Some(r.charge_id))
                .compensate(|o: &Order| RefundPayment { order_id: o.order_id.clone() })
                .retry(quick.clone())
        })
        .step("ship", |s| {
            s.invoke(|o: &Order| ShipOrder {
                order_id: o.order_id.clone(),
                destination: o.destination.clone(),
                flaky_attempts: o.flaky_shipping,
            })
            .on_reply(|o, r| o.shipment_id = Some(r.shipment_id))
            .retry(quick)
        })
        .build()
}
