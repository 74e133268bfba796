//! The order example's participants, built inside the testkit package so suites can run them
//! as child processes (`CARGO_BIN_EXE_order-participant`) and kill them.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,lapin=off".into()))
        .init();
    order_fulfilment::participant_main().await
}
