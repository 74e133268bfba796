//! `sagaflow demo`: the order-fulfilment example end to end, in one process, against the
//! configured RabbitMQ and PostgreSQL.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use orchestrator::Orchestrator;
use participants_sdk::ParticipantConfig;
use sagas::SagaStatus;
use sagas::protocol::StartRequest;

/// Demo options.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// How many sagas to start.
    #[arg(long, default_value_t = 20)]
    sagas: u32,
    /// Make every K-th shipment fail (its saga compensates); 0 for none.
    #[arg(long, default_value_t = 0)]
    fail_every: u32,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

pub(crate) async fn run(config: orchestrator::Config, args: Args) -> anyhow::Result<()> {
    // The demo runs beside whatever else is running: no API port of its own.
    let config = orchestrator::Config { api_addr: String::new(), ..config };
    let node = Orchestrator::connect(config.clone(), crate::registry()?).await?;
    let pool = node.engine().pool().clone();
    order_fulfilment::setup(&pool, &["demo-widget"], i64::from(args.sagas) * 10 + 10).await.context("creating the example tables")?;
    let handle = node.start().await?;
    let pcfg = ParticipantConfig { namespace: config.namespace.clone(), ..ParticipantConfig::default() };
    let mut participants = Vec::new();
    for name in order_fulfilment::PARTICIPANTS {
        participants.push(order_fulfilment::participant(name, pcfg.clone())?.start(pool.clone(), &config.amqp_url).await?);
    }

    let started_at = Instant::now();
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut ids = Vec::with_capacity(args.sagas as usize);
    let started = Arc::new(Mutex::new(Vec::with_capacity(args.sagas as usize)));
    let progress = tokio::spawn(progress(pool.clone(), args.sagas, Arc::clone(&started)));
    for n in 1..=args.sagas {
        let fail = args.fail_every > 0 && n % args.fail_every == 0;
        let order = order_fulfilment::Order {
            order_id: format!("demo-{run_id}-{n}"),
            sku: "demo-widget".into(),
            quantity: 1,
            amount_cents: 1999,
            destination: if fail { order_fulfilment::UNREACHABLE.into() } else { "Main St 1, Springfield".into() },
            ..Default::default()
        };
        let req = StartRequest {
            definition: "order_fulfilment".into(),
            version: None,
            input: serde_json::to_value(&order)?,
            idempotency_key: None,
            saga_id: None,
            priority: None,
        };
        let id = handle.engine().start(&req, None).await?.saga_id;
        ids.push(id);
        started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(id.0);
    }
    let (mut completed, mut compensated, mut stopped) = (0, 0, 0);
    for id in &ids {
        let st = orchestrator::wait_settled(&pool, *id, Duration::from_secs(args.timeout_s)).await?;
        match st.status {
            SagaStatus::Completed => completed += 1,
            SagaStatus::Compensated => compensated += 1,
            _ => stopped += 1,
        }
    }
    let elapsed = started_at.elapsed().as_millis();
    progress.abort();
    if progress.await.is_err() && std::io::stderr().is_terminal() {
        eprintln!();
    }
    for p in participants {
        p.shutdown().await?;
    }
    handle.shutdown().await?;
    println!("demo: sagas={} completed={completed} compensated={compensated} stopped={stopped} elapsed_ms={elapsed}", args.sagas);
    Ok(())
}

/// While the demo runs, how far it got: on a terminal one line redrawn every second, else (piped)
/// a plain line every 5 s. The sagas `started` so far are counted in the database by status.
async fn progress(pool: sqlx::PgPool, total: u32, started: Arc<Mutex<Vec<uuid::Uuid>>>) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let ids = started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let counts: Result<(i64, i64, i64), _> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'compensated'),
                    count(*) FILTER (WHERE status = 'stopped')
             FROM sagaflow.instances WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&pool)
        .await;
        let Ok((completed, compensated, stopped)) = counts else { continue };
        let settled = completed + compensated + stopped;
        let rate = settled as f64 / t0.elapsed().as_secs_f64();
        let line = format!(
            "demo: started {}/{total}, settled {settled} (completed {completed}, compensated {compensated}, stopped {stopped}), {rate:.0} sagas/s",
            ids.len()
        );
        let mut err = std::io::stderr().lock();
        let _ = if terminal { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }
}
