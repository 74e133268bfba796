//! A participant in another language: the Python shipping service in
//! `examples/python-shipping`, written from docs/protocol.md only, stands in for the Rust one.
//! The interpreter is `SAGAFLOW_PYTHON`, else `target/ci-venv/bin/python` (what `scripts/setup.sh`
//! prepares), else `python3`; it needs `pika` and `psycopg`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sagas::SagaStatus;
use testkit::orders;
use testkit::{TestEnv, wait};
use tokio::io::{AsyncBufReadExt, BufReader};

fn python() -> String {
    if let Ok(p) = std::env::var("SAGAFLOW_PYTHON") {
        return p;
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci-venv/bin/python");
    if venv.exists() { venv.to_string_lossy().into_owned() } else { "python3".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_saga_runs_with_the_python_shipping_participant() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let rust = orders::start_participants(&env, &env.amqp_url, &["inventory", "payment"], 1000).await.unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python-shipping/shipping.py");
    let mut py = tokio::process::Command::new(python())
        .arg(script)
        .env("SAGAFLOW_AMQP_URL", &env.amqp_url)
        .env("SAGAFLOW_DATABASE_URL", &env.database_url)
        .env("SAGAFLOW_NAMESPACE", &env.namespace)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the Python participant");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("python participant did not start").unwrap();
    assert_eq!(ready.as_deref(), Some("py-shipping: ready"), "is pika/psycopg installed for {}?", python());

    let mut ids = Vec::new();
    for i in 1..=10u32 {
        let dest = if i.is_multiple_of(5) { order_fulfilment::UNREACHABLE } else { "Main St 1" };
        let req = testkit::orders::order(&format!("py-{i}"), dest, if i == 3 { 2 } else { 0 });
        ids.push(node.engine().start(&req, None).await.unwrap().saga_id);
    }
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(60)).await.unwrap();
    let statuses: Vec<SagaStatus> = states.iter().map(|s| s.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == SagaStatus::Completed).count(), 8, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == SagaStatus::Compensated).count(), 2, "{statuses:?}");
    assert_eq!(states[2].steps[2].attempts, 3, "the flaky order was retried through the Python service");
    assert_eq!(states[4].failure.as_ref().unwrap().code, "no_carrier", "the Python service's rejection code reached the saga");
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM py_shipping.shipments").fetch_one(&env.pool).await.unwrap();
    assert_eq!(shipped, 8, "the Python service shipped every completed order, once");
    let rust_shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM example_shipping.shipments").fetch_one(&env.pool).await.unwrap();
    assert_eq!(rust_shipped, 0);
    let refunded: i64 = sqlx::query_scalar("SELECT count(*) FROM example_payment.charges WHERE refunded_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(refunded, 2);

    let pid = py.id().unwrap();
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), py.wait()).await.expect("python participant did not stop").unwrap();
    assert!(status.success(), "python participant exited with {status}");
    orders::stop_participants(rust).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
