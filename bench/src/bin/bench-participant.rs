//! One benchmark participant as its own process: `bench-participant inventory|payment|shipping`,
//! configured by `SAGAFLOW_AMQP_URL`, `SAGAFLOW_DATABASE_URL`, `SAGAFLOW_NAMESPACE`,
//! `SAGAFLOW_QUORUM_QUEUES`.

use anyhow::Context as _;
use participants_sdk::ParticipantConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).context("usage: bench-participant inventory|payment|shipping")?;
    let _telemetry = participants_sdk::telemetry::init("warn,lapin=off", &name)?;
    let amqp = std::env::var("SAGAFLOW_AMQP_URL").context("SAGAFLOW_AMQP_URL")?;
    let db = std::env::var("SAGAFLOW_DATABASE_URL").context("SAGAFLOW_DATABASE_URL")?;
    let mut config = ParticipantConfig::default();
    if let Ok(ns) = std::env::var("SAGAFLOW_NAMESPACE") {
        config.namespace = ns;
    }
    if let Ok(q) = std::env::var("SAGAFLOW_QUORUM_QUEUES") {
        config.quorum_queues = q.parse().with_context(|| format!("SAGAFLOW_QUORUM_QUEUES=`{q}`"))?;
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(&db)
        .await
        .with_context(|| format!("PostgreSQL at {db}"))?;
    let p = bench::saga::participant(&name, config)?;
    p.run(pool, &amqp, participants_sdk::shutdown_signal()).await?;
    Ok(())
}
