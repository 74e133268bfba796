//! The order example's participants, built inside the testkit package so suites can run them
//! as child processes (`CARGO_BIN_EXE_order-participant`) and kill them.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs to stderr; spans over OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set, as the
    // service named after the participant.
    let service = std::env::args().nth(1).unwrap_or_else(|| "order-participant".into());
    let _telemetry = participants_sdk::telemetry::init("warn,lapin=off", &service)?;
    order_fulfilment::participant_main().await
}
