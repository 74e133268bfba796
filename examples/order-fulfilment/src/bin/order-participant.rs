//! Run one participant of the order example as its own process:
//! `order-participant inventory|payment|shipping` (see [`order_fulfilment::participant_main`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,lapin=off".into()))
        .init();
    order_fulfilment::participant_main().await
}
