//! The `accounts` and `mail` participants, until SIGTERM or Ctrl-C. Addresses from
//! `SAGAFLOW_DATABASE_URL` and `SAGAFLOW_AMQP_URL` (defaults: the local services).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database = std::env::var("SAGAFLOW_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp = std::env::var("SAGAFLOW_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let pool = sqlx::PgPool::connect(&database).await?;
    your_first_saga::setup(&pool).await?;
    let config = participants_sdk::ParticipantConfig::default();
    let accounts = your_first_saga::accounts(config.clone())?.start(pool.clone(), &amqp).await?;
    let mail = your_first_saga::mail(config)?.start(pool, &amqp).await?;
    participants_sdk::shutdown_signal().await;
    accounts.shutdown().await?;
    mail.shutdown().await?;
    Ok(())
}
