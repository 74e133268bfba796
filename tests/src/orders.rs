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

/// A registry with the order-fulfilment definition.
pub fn registry() -> sagas::Registry {
    let mut r = sagas::Registry::new();
    r.register(order_fulfilment::definition().expect("the example's definition builds").erased()).expect("one definition");
    r
}

/// Stock `widget` with `stock` units and start the example's participants called `names` in
/// this process, on `env`'s database, reaching RabbitMQ at `amqp_url` (`env.amqp_url`, or a
/// proxy's URL in front of it).
pub async fn start_participants(
    env: &crate::TestEnv,
    amqp_url: &str,
    names: &[&str],
    stock: i64,
) -> anyhow::Result<Vec<participants_sdk::ParticipantHandle>> {
    order_fulfilment::setup(&env.pool, &["widget"], stock).await?;
    let mut out = Vec::new();
    for name in names {
        out.push(order_fulfilment::participant(name, env.participant_config())?.start(env.pool.clone(), amqp_url).await?);
    }
    Ok(out)
}

/// Shut `participants` down, each finishing what it holds.
pub async fn stop_participants(participants: Vec<participants_sdk::ParticipantHandle>) -> anyhow::Result<()> {
    for p in participants {
        p.shutdown().await?;
    }
    Ok(())
}
