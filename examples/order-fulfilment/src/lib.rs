//! Order fulfilment: reserve stock → charge the card → ship, with the stock released and the
//! charge refunded when a later step fails.
//!
//! # Layout
//! - [`definition`](mod@definition): the saga, in Rust code.
//! - [`commands`]: the commands and replies, shared by the saga and the participants.
//! - [`inventory`], [`payment`], [`shipping`]: the three participants, each with its own tables
//!   (schemas `example_inventory`, `example_payment`, `example_shipping`).
//!
//! Shipping refuses destinations it cannot serve (`destination = "unreachable"`, code
//! `no_carrier`) and fails transiently for the first `flaky_attempts` attempts of an order:
//! the demo and the tests use these to make failures happen on purpose.

pub mod commands;
pub mod definition;
pub mod inventory;
pub mod payment;
pub mod shipping;

use participants_sdk::{Participant, ParticipantConfig};
use sqlx::PgPool;

pub use definition::{Order, definition};

/// The destination shipping refuses.
pub const UNREACHABLE: &str = "unreachable";

/// Create the three participants' tables (idempotent) and stock `skus` with `available` units each.
pub async fn setup(pool: &PgPool, skus: &[&str], available: i64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(include_str!("schema.sql")).execute(&mut *tx).await?;
    for sku in skus {
        sqlx::query("INSERT INTO example_inventory.stock (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available")
            .bind(sku)
            .bind(available)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Stock each `(sku, units)` pair unless that sku is already stocked (a restart keeps what was
/// sold). For the `order-participant` command's `ORDER_EXAMPLE_STOCK`.
pub async fn stock_if_absent(pool: &PgPool, stock: &[(String, i64)]) -> Result<(), sqlx::Error> {
    for (sku, available) in stock {
        sqlx::query("INSERT INTO example_inventory.stock (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO NOTHING")
            .bind(sku)
            .bind(available)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Parse `sku=units,sku=units` (the `ORDER_EXAMPLE_STOCK` variable).
pub fn parse_stock(spec: &str) -> Result<Vec<(String, i64)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (sku, units) = item.split_once('=').ok_or_else(|| format!("`{item}` is not `sku=units`"))?;
            let units: i64 = units.trim().parse().map_err(|_| format!("`{item}`: units must be a whole number"))?;
            if sku.trim().is_empty() || units < 0 {
                return Err(format!("`{item}`: needs a sku and units >= 0"));
            }
            Ok((sku.trim().to_owned(), units))
        })
        .collect()
}

/// The participant called `name` (`inventory`, `payment` or `shipping`).
pub fn participant(name: &str, config: ParticipantConfig) -> Result<Participant, participants_sdk::Error> {
    match name {
        "inventory" => inventory::participant(config),
        "payment" => payment::participant(config),
        "shipping" => shipping::participant(config),
        other => Err(participants_sdk::Error::Invalid(format!("no participant `{other}` in this example (inventory, payment, shipping)"))),
    }
}

/// The three participant names.
pub const PARTICIPANTS: [&str; 3] = ["inventory", "payment", "shipping"];

/// The `order-participant` command: run the participant named by the first argument until
/// SIGTERM or Ctrl-C, configured by `SAGAFLOW_AMQP_URL` (one broker, or a cluster's, separated by
/// commas), `SAGAFLOW_DATABASE_URL` (one server, or a primary and its standbys), `SAGAFLOW_NAMESPACE` and `SAGAFLOW_QUORUM_QUEUES`. `ORDER_EXAMPLE_STOCK=sku=units,...` stocks skus that have no stock row yet.
/// `order-participant ready <name>` exits 0 only while that participant (in this container or
/// host) consumes its queue: its ready file was touched within 15 s (a health check).
pub async fn participant_main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let usage = "usage: order-participant inventory|payment|shipping, or order-participant ready inventory|payment|shipping";
    let name = std::env::args().nth(1).context(usage)?;
    if name == "ready" {
        // The container's health check: is the participant of this container consuming?
        let name = std::env::args().nth(2).context(usage)?;
        let path = ready_file(&name);
        if participants_sdk::ready_file_is_fresh(&path, participants_sdk::READY_TOUCH * 3) {
            return Ok(());
        }
        anyhow::bail!("{name} is not consuming ({} is missing or older than 15 s)", path.display());
    }
    let stock = match std::env::var("ORDER_EXAMPLE_STOCK") {
        Ok(spec) => parse_stock(&spec).map_err(|e| anyhow::anyhow!("ORDER_EXAMPLE_STOCK: {e}"))?,
        Err(_) => Vec::new(),
    };
    let amqp = std::env::var("SAGAFLOW_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let db = std::env::var("SAGAFLOW_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut config = ParticipantConfig { ready_file: Some(ready_file(&name)), ..ParticipantConfig::default() };
    if let Ok(ns) = std::env::var("SAGAFLOW_NAMESPACE") {
        config.namespace = ns;
    }
    if let Ok(q) = std::env::var("SAGAFLOW_QUORUM_QUEUES") {
        config.quorum_queues = q.parse().map_err(|e| anyhow::anyhow!("SAGAFLOW_QUORUM_QUEUES=`{q}`: {e}"))?;
    }
    let participant = participant(&name, config)?;
    // The services may be restarting when this process starts: keep trying for a while.
    let started = std::time::Instant::now();
    let handle = loop {
        let attempt = async {
            // A short wait per try: the loop around retries, and says why each try failed.
            // One server, or a primary and its standbys (the pool follows a failover).
            let pool = participants_sdk::connect_pool(&db, 8)
                .await
                .with_context(|| format!("connecting to PostgreSQL at {}", participants_sdk::redact(&db)))?;
            setup(&pool, &[], 0).await.context("creating the example tables")?;
            stock_if_absent(&pool, &stock).await.context("stocking ORDER_EXAMPLE_STOCK")?;
            anyhow::Ok(participant.start(pool, &amqp).await?)
        };
        match attempt.await {
            Ok(h) => break h,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(120) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot start yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    participants_sdk::shutdown_signal().await;
    handle.shutdown().await?;
    Ok(())
}

/// Where participant `name` of this example says it is consuming (for `order-participant ready`).
fn ready_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("order-participant-{name}.ready"))
}

#[cfg(test)]
mod tests {
    use super::parse_stock;

    #[test]
    fn stock_specs_parse_or_say_what_is_wrong() {
        assert_eq!(parse_stock("widget=10, gadget = 0,").unwrap(), [("widget".to_owned(), 10), ("gadget".to_owned(), 0)]);
        assert!(parse_stock("").unwrap().is_empty());
        assert!(parse_stock("widget").unwrap_err().contains("not `sku=units`"));
        assert!(parse_stock("widget=many").unwrap_err().contains("whole number"));
        assert!(parse_stock("=3").unwrap_err().contains("needs a sku"));
        assert!(parse_stock("w=-1").unwrap_err().contains("units >= 0"));
    }
}
