//! Start requests for the order-fulfilment example, as the suites use them.

use order_fulfilment::Order;
use sagas::protocol::StartRequest;

/// An order of one `widget` for 1.00 that ships to `destination` (use
/// [`order_fulfilment::UNREACHABLE`] to have shipping refuse it) after `flaky_shipping`
/// transient failures.
pub fn order(order_id: &str, destination: &str, flaky_shipping: u32) -> StartRequest {
    let o = Order {
        order_id: order_id.into(),
        sku: "widget".into(),
        quantity: 1,
        amount_cents: 100,
        destination: destination.into(),
        flaky_shipping,
        ..Order::default()
    };
    StartRequest {
        definition: "order_fulfilment".into(),
        version: None,
        input: serde_json::to_value(o).expect("an order encodes"),
        idempotency_key: None,
        saga_id: None,
    }
}

/// Order number `i` of a mixed run: every `fail_every`-th one is refused by shipping.
pub fn mixed(prefix: &str, i: u32, fail_every: u32) -> StartRequest {
    let dest = if fail_every > 0 && i.is_multiple_of(fail_every) { order_fulfilment::UNREACHABLE } else { "Main St 1" };
    order(&format!("{prefix}-{i}"), dest, 0)
}
