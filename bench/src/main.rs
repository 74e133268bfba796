//! `order-saga-3`: the benchmark harness. For each variant, measure and node count it starts
//! fresh orchestrator nodes and participants as processes (on a fresh database and AMQP
//! namespace), runs the measure, checks every saga's records, and prints one line per run and
//! one per median, plus CPU seconds and peak memory per process group.
//!
//! Services: `SAGAFLOW_TEST_AMQP_URL` / `SAGAFLOW_TEST_DATABASE_URL`, else the local defaults.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bench::procs;
use bench::saga::{self, Input};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sagas::protocol::StartRequest;
use sagas::{SagaId, SagaStatus};
use testkit::{Node, TestEnv};
use tokio::sync::{Semaphore, oneshot};

#[derive(Parser, Clone)]
#[command(name = "order-saga-3", about = "Sagaflow benchmark: order-saga-3 (see docs/performance.md)")]
struct Args {
    /// `ok`, `fail20`, or `both`.
    #[arg(long, default_value = "both")]
    variant: String,
    /// `throughput`, `latency`, `floor` (RabbitMQ alone, see `bench::floor`), or `all`.
    #[arg(long, default_value = "all")]
    measure: String,
    /// Orchestrator node counts to run the throughput measure with, e.g. `1,2,4`.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Sagas per throughput run.
    #[arg(long, default_value_t = 5000)]
    sagas: u64,
    /// Reply partitions (the nodes' and the client's `partitions`); 0 for the one replies queue.
    #[arg(long, default_value_t = 0)]
    partitions: u16,
    /// Declare quorum queues (nodes, participants, client): for a RabbitMQ cluster, named by
    /// `SAGAFLOW_TEST_AMQP_URL` as several URLs separated by commas.
    #[arg(long)]
    quorum_queues: bool,
    /// Start this many RabbitMQ nodes as one cluster in containers (Docker, the image
    /// `rabbitmq:4-management` built by `../shared/containers`) and run against them with quorum
    /// queues (each process picks the broker it tries first by its pid); 0: the broker of
    /// `SAGAFLOW_TEST_AMQP_URL`.
    #[arg(long, default_value_t = 0)]
    broker_nodes: usize,
    /// The brokers' URLs when `--broker-nodes` started them.
    #[arg(skip)]
    brokers: Option<String>,
    /// Sagas in flight during a throughput run.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Sagas per latency run (one at a time).
    #[arg(long, default_value_t = 300)]
    latency_sagas: u64,
    /// Runs per measure; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Instead of the measures: run `ok` for this many minutes at full load and report memory
    /// every 30 s.
    #[arg(long, default_value_t = 0)]
    sustain_minutes: u64,
}

/// One saga's check: n, fail, status, successful invokes, rejected invokes, compensations, all
/// records, compensation of step 1 before step 0.
type SagaRecord = (i64, bool, String, i64, i64, i64, i64, Option<bool>);

/// Where a saga's outcome is delivered.
type Waiters = Arc<Mutex<HashMap<SagaId, oneshot::Sender<SagaStatus>>>>;

struct Cluster {
    env: TestEnv,
    nodes: Vec<Node>,
    participants: Vec<Node>,
    engine: orchestrator::Engine,
    client: orchestrator::ClientHandle,
    waiters: Waiters,
    listener: tokio::task::JoinHandle<()>,
    _conn: lapin::Connection,
    /// The brokers run in containers (`--broker-nodes`).
    in_containers: bool,
}

/// RabbitMQ and PostgreSQL: `SAGAFLOW_TEST_AMQP_URL` / `SAGAFLOW_TEST_DATABASE_URL`, else the
/// local defaults; the brokers `--broker-nodes` started, when it did.
fn services(args: &Args) -> anyhow::Result<(String, String)> {
    let (amqp, db) = testkit::env::service_urls()?.unwrap_or_else(|| {
        let local = orchestrator::Config::default();
        (local.amqp_url, local.database_url)
    });
    Ok((args.brokers.clone().unwrap_or(amqp), db))
}

fn sibling(name: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let path: PathBuf = exe.parent().context("no parent directory")?.join(name);
    anyhow::ensure!(path.exists(), "{} is missing: build with `cargo build --release -p bench`", path.display());
    Ok(path.to_string_lossy().into_owned())
}

impl Cluster {
    async fn start(nodes: usize, args: &Args) -> anyhow::Result<Self> {
        let (partitions, quorum_queues) = (args.partitions, args.quorum_queues || args.broker_nodes > 0);
        let (amqp, db) = services(args)?;
        let env = TestEnv::on_services(amqp, db).await?;
        // The client publishes its starts itself, as a service embedding the Rust API would.
        let config = orchestrator::Config { partitions, quorum_queues, ..env.config("client") };
        let client = orchestrator::Orchestrator::connect(config, saga::registry()?).await?.client().await?;
        participants_sdk::ensure_schema(&env.pool, false).await?;
        let engine = client.engine().clone();
        let mut vars = env.node_env("x");
        // Few connections each: this is a 2-core machine, and PostgreSQL allows 100 in all.
        vars.retain(|(k, _)| k != "SAGAFLOW_DATABASE_MAX_CONNECTIONS");
        vars.push(("SAGAFLOW_DATABASE_MAX_CONNECTIONS".into(), "10".into()));
        vars.retain(|(k, _)| k != "SAGAFLOW_TIMER_POLL_MS" && k != "SAGAFLOW_RELAY_POLL_MS");
        vars.push(("SAGAFLOW_PARTITIONS".into(), partitions.to_string()));
        vars.push(("SAGAFLOW_QUORUM_QUEUES".into(), quorum_queues.to_string()));
        let node_exe = sibling("bench-node")?;
        let part_exe = sibling("bench-participant")?;
        let mut ns = Vec::new();
        for i in 0..nodes {
            let id = format!("bench-node-{i}");
            let mut v = vars.clone();
            v.retain(|(k, _)| k != "SAGAFLOW_NODE_ID");
            v.push(("SAGAFLOW_NODE_ID".into(), id.clone()));
            ns.push(Node::spawn_with(&node_exe, &["serve"], v, &id)?);
        }
        let mut ps = Vec::new();
        for p in saga::PARTICIPANTS {
            ps.push(Node::spawn_with(&part_exe, &[p], vars.clone(), &format!("bench-{p}"))?);
        }

        // Outcomes arrive as lifecycle events.
        let conn = env.amqp().await?;
        let ch = conn.create_channel().await?;
        let names = env.names();
        let q = format!("{}.bench-outcomes", env.namespace);
        sagaflow_amqp::transport::declare_exchange(&ch, &names.events_exchange(), lapin::ExchangeKind::Topic).await?;
        ch.queue_declare(q.as_str().into(), QueueDeclareOptions { auto_delete: true, ..Default::default() }, FieldTable::default()).await?;
        for ev in ["completed", "compensated", "stopped"] {
            let key = format!("{}.{ev}", saga::NAME);
            ch.queue_bind(
                q.as_str().into(),
                names.events_exchange().as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        ch.basic_qos(1000, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(q.as_str().into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await?;
        let waiters: Waiters = Arc::default();
        let w = Arc::clone(&waiters);
        let listener = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let Ok(ev) = serde_json::from_slice::<sagas::protocol::LifecycleEvent>(&d.data) else { continue };
                let status = match ev.event {
                    sagas::SagaEvent::Completed => SagaStatus::Completed,
                    sagas::SagaEvent::Compensated => SagaStatus::Compensated,
                    _ => SagaStatus::Stopped,
                };
                if let Some(tx) = w.lock().expect("not poisoned").remove(&ev.saga_id) {
                    let _ = tx.send(status);
                }
            }
        });
        let in_containers = args.broker_nodes > 0;
        let cluster = Self { env, nodes: ns, participants: ps, engine, client, waiters, listener, _conn: conn, in_containers };
        // Warm up (connections, prepared statements) and make sure every process is consuming.
        let warm: Vec<_> = (0..20).map(|i| cluster.run_one(1_000_000 + i, false)).collect();
        for w in warm {
            tokio::time::timeout(Duration::from_secs(60), w).await.context("warm-up sagas did not finish")??;
        }
        Ok(cluster)
    }

    /// Start saga `n` and wait for its outcome; returns the time from start to outcome.
    fn run_one(&self, n: u64, fail: bool) -> impl std::future::Future<Output = anyhow::Result<(Duration, SagaStatus)>> + use<> {
        let (engine, waiters) = (self.engine.clone(), Arc::clone(&self.waiters));
        async move {
            let id = SagaId::new();
            let (tx, rx) = oneshot::channel();
            waiters.lock().expect("not poisoned").insert(id, tx);
            let req = StartRequest {
                definition: saga::NAME.into(),
                version: None,
                input: serde_json::to_value(Input { n, fail })?,
                idempotency_key: None,
                saga_id: Some(id),
                priority: None,
            };
            let t0 = Instant::now();
            engine.start(&req, None).await?;
            let status = rx.await.context("outcome listener stopped")?;
            Ok((t0.elapsed(), status))
        }
    }

    fn usage(&self) -> Vec<(&'static str, procs::Usage)> {
        let ids = |v: &[Node]| v.iter().filter_map(Node::pid).collect::<Vec<u32>>();
        let mut groups = vec![
            ("orchestrator", procs::total(&ids(&self.nodes))),
            ("participants", procs::total(&ids(&self.participants))),
            // With `--broker-nodes`, the containers' RabbitMQ processes (and the local one's idle ones).
            ("rabbitmq", procs::total(&procs::find("rabbit"))),
            ("postgresql", procs::total(&procs::find("postgres"))),
            ("harness", procs::usage(std::process::id()).unwrap_or_default()),
        ];
        if self.in_containers {
            // Docker's userland proxy carries every byte between the host's ports and the brokers.
            groups.push(("docker-proxy", procs::total(&procs::find("docker-proxy"))));
        }
        groups
    }

    /// Every saga of the run ended as its input says, with exactly the expected participant
    /// records, compensations in reverse order.
    async fn correct(&self, expected: u64) -> anyhow::Result<bool> {
        let rows: Vec<SagaRecord> = sqlx::query_as(
            "SELECT (i.state->'data'->>'n')::bigint, (i.state->'data'->>'fail')::bool, i.status,
                    count(*) FILTER (WHERE x.kind = 'invoke' AND x.outcome->>'type' = 'success'),
                    count(*) FILTER (WHERE x.kind = 'invoke' AND x.outcome->>'type' = 'rejected'),
                    count(*) FILTER (WHERE x.kind = 'compensate'),
                    count(*),
                    bool_and(x.recorded_at < y.recorded_at) FILTER (WHERE x.kind = 'compensate' AND x.step = 1)
             FROM sagaflow.instances i
             LEFT JOIN sagaflow_participant.inbox x ON x.saga_id = i.id
             LEFT JOIN sagaflow_participant.inbox y ON y.saga_id = i.id AND y.kind = 'compensate' AND y.step = 0
             GROUP BY i.id",
        )
        .fetch_all(&self.env.pool)
        .await?;
        let mut ok = rows.len() as u64 == expected;
        for (n, fail, status, succeeded, rejected, compensated, _total, reverse) in &rows {
            let good = if *fail {
                status == "compensated" && (*succeeded, *rejected, *compensated) == (2, 1, 2) && *reverse == Some(true)
            } else {
                status == "completed" && (*succeeded, *rejected, *compensated) == (3, 0, 0)
            };
            if !good {
                eprintln!(
                    "order-saga-3: saga {n} is wrong: status={status} succeeded={succeeded} rejected={rejected} compensated={compensated} reverse={reverse:?}"
                );
                ok = false;
            }
        }
        Ok(ok)
    }

    async fn stop(self) -> anyhow::Result<()> {
        for n in self.nodes.into_iter().chain(self.participants) {
            let _ = n.terminate().await;
        }
        self.listener.abort();
        self.client.shutdown().await?;
        self.env.cleanup(&saga::PARTICIPANTS).await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // nearest rank: the smallest value with at least p% of the values at or below it
    let rank = sorted.iter().enumerate().position(|(i, _)| (i + 1) as f64 >= p / 100.0 * sorted.len() as f64).unwrap_or(sorted.len() - 1);
    sorted[rank].as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Run {
    sagas_per_s: f64,
    p50: f64,
    p99: f64,
    correct: bool,
}

async fn measure(kind: &str, variant: &str, nodes: usize, args: &Args) -> anyhow::Result<Run> {
    let cluster = Cluster::start(nodes, args).await?;
    let fail20 = variant == "fail20";
    let (count, concurrency) = if kind == "throughput" { (args.sagas, args.concurrency) } else { (args.latency_sagas, 1) };
    let before = cluster.usage();
    let permits = Arc::new(Semaphore::new(concurrency));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=count {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let fut = cluster.run_one(n, fail20 && n % 5 == 0);
        tasks.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        latencies.push(r??.0);
    }
    let elapsed = t0.elapsed();
    let after = cluster.usage();
    latencies.sort();
    let correct = cluster.correct(count + 20).await?;
    let run = Run {
        sagas_per_s: count as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        correct,
    };
    for ((group, b), (_, a)) in before.iter().zip(&after) {
        println!(
            "order-saga-3 variant={variant} measure={kind} nodes={nodes} group={group} cpu_s={:.2} peak_mib={:.0}",
            (a.cpu_s - b.cpu_s).max(0.0),
            a.peak_mib
        );
    }
    cluster.stop().await?;
    Ok(run)
}

async fn sustain(args: &Args) -> anyhow::Result<()> {
    let cluster = Arc::new(Cluster::start(1, args).await?);
    let end = Instant::now() + Duration::from_secs(args.sustain_minutes * 60);
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let c = Arc::clone(&cluster);
    let reporter = tokio::spawn(async move {
        let t0 = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let rss = |v: &[Node]| v.iter().filter_map(Node::pid).filter_map(procs::rss_mib).sum::<f64>();
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status = 'completed'")
                .fetch_one(&c.env.pool)
                .await
                .unwrap_or(-1);
            println!(
                "order-saga-3 sustain t_s={} completed={done} orchestrator_rss_mib={:.1} participants_rss_mib={:.1}",
                t0.elapsed().as_secs(),
                rss(&c.nodes),
                rss(&c.participants)
            );
        }
    });
    let mut n = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        n += 1;
        let fut = cluster.run_one(n, false);
        tasks.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    reporter.abort();
    let _ = reporter.await; // drops its handle on the cluster
    println!("order-saga-3 sustain sagas={n} minutes={}", args.sustain_minutes);
    let cluster = Arc::into_inner(cluster).context("cluster still shared")?;
    cluster.stop().await
}

/// Messages RabbitMQ delivers per `ok` saga: three commands, three replies and the outcome event
/// (the `started` event is not published: nodes run with `started_events` off, the default).
const HOPS_PER_SAGA: u8 = 7;

/// Durable commits in sequence per `ok` saga: the start, then for each step the participant's
/// record and the orchestrator's decision on the reply.
const COMMITS_PER_SAGA: u8 = 7;

/// The floors (`bench::floor`): the saga's messages through RabbitMQ alone, as many chains and
/// as many in flight as a throughput run and then one at a time, and a durable step
/// transaction on PostgreSQL alone; then the least a saga's start to outcome can take here.
async fn floor(args: &Args) -> anyhow::Result<()> {
    let (amqp, db) = services(args)?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db).await.context("connecting to PostgreSQL")?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut thr, mut lat, mut db_lat) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let f = bench::floor::messaging(&amqp, args.sagas, args.concurrency, HOPS_PER_SAGA).await?;
        let per_chain = |s: f64| s * 1000.0 / args.sagas as f64;
        let (rabbit_ms, client_ms) = (per_chain(f.rabbitmq_cpu_s), per_chain(f.client_cpu_s));
        println!(
            "order-saga-3 measure=floor-messaging run={run} in_flight={} hops={HOPS_PER_SAGA} chains_per_s={:.1} rabbitmq_cpu_ms_per_chain={rabbit_ms:.3} client_cpu_ms_per_chain={client_ms:.3}",
            args.concurrency, f.chains_per_s
        );
        thr.push((f.chains_per_s, rabbit_ms, client_ms));
        let one = bench::floor::messaging(&amqp, args.latency_sagas, 1, HOPS_PER_SAGA).await?;
        let (p50, p99) = (percentile(&one.chain_times, 50.0), percentile(&one.chain_times, 99.0));
        println!(
            "order-saga-3 measure=floor-messaging run={run} in_flight=1 hops={HOPS_PER_SAGA} chain_p50_ms={p50:.2} chain_p99_ms={p99:.2}"
        );
        lat.push((p50, p99));
        let txs = bench::floor::step_transactions(&pool, args.latency_sagas).await?;
        let (t50, t99) = (percentile(&txs, 50.0), percentile(&txs, 99.0));
        let mean = txs.iter().copied().map(ms).sum::<f64>() / txs.len().max(1) as f64;
        println!(
            "order-saga-3 measure=floor-postgresql run={run} step_tx_p50_ms={t50:.3} step_tx_p99_ms={t99:.3} step_tx_mean_ms={mean:.3}"
        );
        db_lat.push((t50, t99));
    }
    let rabbit_ms = median(thr.iter().map(|r| r.1).collect());
    println!(
        "order-saga-3 measure=floor-messaging in_flight={} hops={HOPS_PER_SAGA} chains_per_s={:.1} rabbitmq_cpu_ms_per_chain={rabbit_ms:.3} client_cpu_ms_per_chain={:.3} rabbitmq_alone_on_all_cores_chains_per_s={:.0}",
        args.concurrency,
        median(thr.iter().map(|r| r.0).collect()),
        median(thr.iter().map(|r| r.2).collect()),
        cores * 1000.0 / rabbit_ms
    );
    let (chain50, tx50) = (median(lat.iter().map(|r| r.0).collect()), median(db_lat.iter().map(|r| r.0).collect()));
    println!(
        "order-saga-3 measure=floor-messaging in_flight=1 hops={HOPS_PER_SAGA} chain_p50_ms={chain50:.2} chain_p99_ms={:.2}",
        median(lat.iter().map(|r| r.1).collect())
    );
    println!(
        "order-saga-3 measure=floor-postgresql step_tx_p50_ms={tx50:.3} step_tx_p99_ms={:.3}",
        median(db_lat.iter().map(|r| r.1).collect())
    );
    // A saga's start and each reply is a durable decision, and each command a durable record:
    // seven commits, each before the message that follows it, plus the seven messages.
    println!(
        "order-saga-3 measure=floor latency_p50_ms={:.2} (the {HOPS_PER_SAGA} messages in sequence, {chain50:.2} ms, and {COMMITS_PER_SAGA} step transactions of {tx50:.3} ms)",
        chain50 + f64::from(COMMITS_PER_SAGA) * tx50
    );
    pool.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .init();
    let mut args = Args::parse();
    // Removed (containers and network) when dropped, at the end of main.
    let _brokers = if args.broker_nodes > 0 {
        let brokers = testkit::cluster::RabbitCluster::start(args.broker_nodes).await?;
        brokers.wait_whole(0, Duration::from_secs(120)).await?;
        args.brokers = Some(brokers.urls(""));
        eprintln!("order-saga-3: a RabbitMQ cluster of {} nodes in containers: {}", args.broker_nodes, brokers.names.join(", "));
        Some(brokers)
    } else {
        None
    };
    if args.sustain_minutes > 0 {
        return sustain(&args).await;
    }
    let variants: Vec<&str> = match args.variant.as_str() {
        "both" => vec!["ok", "fail20"],
        v @ ("ok" | "fail20") => vec![v],
        other => anyhow::bail!("--variant {other}: expected ok, fail20 or both"),
    };
    let measures: Vec<&str> = match args.measure.as_str() {
        "all" => vec!["throughput", "latency", "floor"],
        m @ ("throughput" | "latency" | "floor") => vec![m],
        other => anyhow::bail!("--measure {other}: expected throughput, latency, floor or all"),
    };
    if measures.contains(&"floor") {
        floor(&args).await?;
    }
    let mut all_correct = true;
    for variant in &variants {
        for kind in measures.iter().filter(|m| **m != "floor") {
            let node_counts = if *kind == "throughput" { args.nodes.clone() } else { vec![1] };
            for nodes in node_counts {
                let mut runs = Vec::new();
                for run in 1..=args.runs {
                    let r = measure(kind, variant, nodes, &args).await?;
                    println!(
                        "order-saga-3 variant={variant} measure={kind} nodes={nodes} run={run} sagas_per_s={:.1} p50_ms={:.2} p99_ms={:.2} correct={}",
                        r.sagas_per_s, r.p50, r.p99, r.correct
                    );
                    all_correct &= r.correct;
                    runs.push(r);
                }
                println!(
                    "order-saga-3 variant={variant} measure={kind} nodes={nodes} sagas_per_s={:.1} p50_ms={:.2} p99_ms={:.2} correct={}",
                    median(runs.iter().map(|r| r.sagas_per_s).collect()),
                    median(runs.iter().map(|r| r.p50).collect()),
                    median(runs.iter().map(|r| r.p99).collect()),
                    runs.iter().all(|r| r.correct)
                );
            }
        }
    }
    anyhow::ensure!(all_correct, "a run failed its correctness check; its figures do not count");
    Ok(())
}
