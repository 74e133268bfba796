//! Run one participant of the order example as its own process:
//! `order-participant inventory|payment|shipping` (see [`order_fulfilment::participant_main`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs to stderr; spans over OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set, as the
    // service named after the participant.
    let service = std::env::args().nth(1).unwrap_or_else(|| "order-participant".into());
    let _telemetry = participants_sdk::telemetry::init("info,lapin=off", &service)?;
    order_fulfilment::participant_main().await
}
