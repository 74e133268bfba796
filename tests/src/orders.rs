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
        priority: None,
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

/// Order `{prefix}-{i}` of a long run under faults: every fifth is refused by shipping (it must
/// end compensated), every seventh ships after two transient failures; idempotent by its id, so
/// a start that failed mid-fault can be made again.
pub fn numbered(prefix: &str, i: u32) -> StartRequest {
    let dest = if i.is_multiple_of(5) { order_fulfilment::UNREACHABLE } else { "Main St 1" };
    let mut req = order(&format!("{prefix}-{i}"), dest, if i.is_multiple_of(7) { 2 } else { 0 });
    req.idempotency_key = Some(format!("{prefix}-{i}"));
    req
}

/// How a run of `n` [`numbered`] orders ended, from the participants' own tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Orders with no saga, ended the wrong way, or missing an effect.
    pub lost: i64,
    /// Orders with an effect (reservation, charge, shipment, release, refund) made twice.
    pub duplicate_effects: i64,
    /// Compensated orders whose refund did not come before the release.
    pub misordered: i64,
    /// Orders whose saga has not settled.
    pub stuck: i64,
}

/// One order's records: id, reserved, released, charged, refunded, shipped, refund before
/// release, saga status.
type OrderRecord = (String, i64, i64, i64, i64, i64, Option<bool>, String);

/// Check every one of the `n` [`numbered`] orders of `prefix` against its saga and its effects.
pub async fn tally(pool: &sqlx::PgPool, prefix: &str, n: u32) -> anyhow::Result<Tally> {
    let per_order: Vec<OrderRecord> = sqlx::query_as(
        "SELECT o.order_id,
                (SELECT count(*) FROM example_inventory.reservations r WHERE r.order_id = o.order_id),
                (SELECT count(*) FROM example_inventory.reservations r WHERE r.order_id = o.order_id AND released_at IS NOT NULL),
                (SELECT count(*) FROM example_payment.charges c WHERE c.order_id = o.order_id),
                (SELECT count(*) FROM example_payment.charges c WHERE c.order_id = o.order_id AND refunded_at IS NOT NULL),
                (SELECT count(*) FROM example_shipping.shipments s WHERE s.order_id = o.order_id),
                (SELECT bool_and(c.refunded_at < r.released_at) FROM example_payment.charges c JOIN example_inventory.reservations r USING (order_id) WHERE c.order_id = o.order_id),
                i.status
         FROM (SELECT state->'data'->>'order_id' AS order_id, id FROM sagaflow.instances) o JOIN sagaflow.instances i USING (id)
         WHERE o.order_id LIKE $1 || '-%'",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    let mut t = Tally { lost: i64::from(n) - i64::try_from(per_order.len())?, ..Tally::default() };
    for (order_id, reserved, released, charged, refunded, shipped, refund_first, status) in &per_order {
        let i: u32 = order_id.strip_prefix(prefix).and_then(|s| s.strip_prefix('-')).unwrap_or_default().parse()?;
        let compensates = i.is_multiple_of(5);
        let twice = *reserved > 1 || *charged > 1 || *shipped > 1 || *released > 1 || *refunded > 1;
        if twice {
            t.duplicate_effects += 1;
        }
        let expected_status = if compensates { "compensated" } else { "completed" };
        if status.as_str() != expected_status {
            if matches!(status.as_str(), "completed" | "compensated" | "stopped") {
                t.lost += 1; // ended, but not the way its input says it must
            } else {
                t.stuck += 1;
            }
            continue;
        }
        let expected = if compensates { (1, 1, 1, 1, 0) } else { (1, 0, 1, 0, 1) };
        if (*reserved, *released, *charged, *refunded, *shipped) != expected && !twice {
            t.lost += 1; // an effect missing
        }
        if compensates && *refund_first != Some(true) {
            t.misordered += 1;
        }
    }
    Ok(t)
}

/// Start [`numbered`] orders `from..=to` of `prefix` through `client` and push their saga ids
/// to `ids`, retrying each for up to 2 minutes while a service is away (a start is idempotent
/// by its order id). Panics naming the order that could not be started.
pub async fn start_numbered(client: &orchestrator::Engine, prefix: &str, from: u32, to: u32, ids: &mut Vec<sagas::SagaId>) {
    for i in from..=to {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            match client.start(&numbered(prefix, i), None).await {
                Ok(s) => {
                    ids.push(s.saga_id);
                    break;
                }
                Err(e) => {
                    assert!(std::time::Instant::now() < give_up, "order {prefix}-{i} could not be started: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Wait until `n` sagas are settled (completed, compensated or stopped), for up to 10 minutes;
/// on time out, panic with how many were and what `logs` returns (the processes' logs).
pub async fn wait_all_settled(pool: &sqlx::PgPool, n: u32, logs: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let settled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status IN ('completed', 'compensated', 'stopped')")
                .fetch_one(pool)
                .await
                .unwrap();
        if settled >= i64::from(n) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{settled} of {n} settled\n{}", logs());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Wait up to 60 s for the orchestrator's outbox to empty; the rows left.
pub async fn outbox_left(pool: &sqlx::PgPool) -> i64 {
    let mut left = 0;
    for _ in 0..300 {
        left = sqlx::query_scalar("SELECT count(*) FROM sagaflow.outbox").fetch_one(pool).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    left
}
