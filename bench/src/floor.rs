//! The messaging floor: what RabbitMQ alone costs for the messages of an order-saga-3 saga,
//! with no database and no saga logic. Chains of `hops` messages run through one durable queue,
//! at most `in_flight` chains at a time: each message is persistent and published with a
//! confirm, and the message it answers is acked only once that confirm came back, as the
//! orchestrator and the participants do. The chains per second and RabbitMQ's CPU seconds per
//! chain bound what any design sending these messages can reach on this machine. With one
//! chain at a time, a chain's time is the least its messages take in sequence; with
//! [`step_transactions`] (the least a durable step transaction takes) it gives the least a
//! saga's start to outcome can take.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use sagaflow_amqp::transport;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::{Semaphore, mpsc};

use crate::procs;

/// A message's body: about the size of a command or a reply of the benchmark saga.
const BODY: usize = 256;

/// Headers shaped like a command's (`sagas::protocol`): the broker stores and delivers them.
const HEADERS: &[(&str, &str)] = &[
    ("x-saga-id", "01a2094c-b253-737b-b5da-de9434bf1912"),
    ("x-saga-definition", "order_saga_3"),
    ("x-saga-version", "1"),
    ("x-saga-step", "1"),
    ("x-saga-step-name", "charge_payment"),
    ("x-saga-kind", "invoke"),
    ("x-saga-attempt", "1"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
];

/// What one floor run measured.
pub struct Floor {
    /// Chains finished per second, from the first publish to the last ack.
    pub chains_per_s: f64,
    /// RabbitMQ's CPU seconds over the run.
    pub rabbitmq_cpu_s: f64,
    /// This process's CPU seconds over the run (publishing, consuming, acking).
    pub client_cpu_s: f64,
    /// With one chain in flight, how long each chain took, sorted.
    pub chain_times: Vec<Duration>,
}

/// Run `chains` chains of `hops` messages, `in_flight` at a time, on a fresh queue (deleted
/// after).
pub async fn messaging(amqp_url: &str, chains: u64, in_flight: usize, hops: u8) -> anyhow::Result<Floor> {
    anyhow::ensure!(hops > 0 && in_flight > 0, "hops and in_flight must be positive");
    let conn = transport::connect(amqp_url, Duration::from_secs(10)).await.context("connecting to RabbitMQ")?;
    let queue = format!("sagaflow-floor-{}", uuid::Uuid::now_v7().simple());
    let publish_ch = transport::confirm_channel(&conn).await?;
    publish_ch
        // Durable, and gone with its consumer should a run stop half-way.
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { durable: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let consume_ch = conn.create_channel().await?;
    consume_ch.basic_qos(u16::try_from(in_flight * 2).unwrap_or(u16::MAX), BasicQosOptions::default()).await?;
    let mut deliveries =
        consume_ch.basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let relay = {
        let (ch, queue, done) = (publish_ch.clone(), queue.clone(), done_tx.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = deliveries.next().await {
                let (ch, queue, done) = (ch.clone(), queue.clone(), done.clone());
                tokio::spawn(async move {
                    let next = d.data.first().map_or(u8::MAX, |hop| hop.saturating_add(1));
                    let r = async {
                        if next < hops {
                            publish(&ch, &queue, next).await?;
                        }
                        d.ack(BasicAckOptions::default()).await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if r.is_err() || next >= hops {
                        let _ = done.send(r);
                    }
                });
            }
        })
    };

    let rabbit = || procs::total(&procs::find("rabbit")).cpu_s;
    let me = || procs::usage(std::process::id()).unwrap_or_default().cpu_s;
    let (rabbit0, me0) = (rabbit(), me());
    let t0 = Instant::now();
    let permits = Arc::new(Semaphore::new(in_flight));
    let starter = {
        let (ch, queue, permits, done) = (publish_ch.clone(), queue.clone(), Arc::clone(&permits), done_tx);
        tokio::spawn(async move {
            for _ in 0..chains {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                permit.forget();
                let (ch, queue, done) = (ch.clone(), queue.clone(), done.clone());
                tokio::spawn(async move {
                    if let Err(e) = publish(&ch, &queue, 0).await {
                        let _ = done.send(Err(e));
                    }
                });
            }
        })
    };
    let (mut chain_times, mut last) = (Vec::new(), t0);
    for _ in 0..chains {
        let r = tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await.context("a chain did not finish in 60 s")?;
        r.context("the chains stopped")??;
        if in_flight == 1 {
            // One at a time: a chain starts when the one before it ended.
            chain_times.push(last.elapsed());
            last = Instant::now();
        }
        permits.add_permits(1);
    }
    let elapsed = t0.elapsed();
    chain_times.sort();
    let floor = Floor {
        chains_per_s: chains as f64 / elapsed.as_secs_f64(),
        rabbitmq_cpu_s: rabbit() - rabbit0,
        client_cpu_s: me() - me0,
        chain_times,
    };
    starter.abort();
    relay.abort();
    publish_ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(floor)
}

/// The database floor: one client runs `count` step transactions one after the other (`BEGIN`,
/// an `UPDATE` of a row, an `INSERT` of a history-like row, `COMMIT`, as sqlx sends them, fsync
/// and `synchronous_commit` as configured) on tables it creates in `pool` and drops after;
/// returns each transaction's time, sorted.
pub async fn step_transactions(pool: &PgPool, count: u64) -> anyhow::Result<Vec<Duration>> {
    let schema = format!("floor_{}", uuid::Uuid::now_v7().simple());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.state (id integer PRIMARY KEY, n bigint NOT NULL);
         CREATE TABLE {schema}.log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), body jsonb NOT NULL);
         INSERT INTO {schema}.state VALUES (1, 0);"
    )))
    .execute(pool)
    .await?;
    let (update, insert) =
        (format!("UPDATE {schema}.state SET n = n + 1 WHERE id = 1"), format!("INSERT INTO {schema}.log (body) VALUES ($1)"));
    let body = serde_json::json!({"type": "reply", "step": 1, "outcome": {"type": "success", "output": null}});
    let mut times = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        let mut tx = pool.begin().await?;
        sqlx::query(AssertSqlSafe(update.as_str())).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(insert.as_str())).bind(&body).execute(&mut *tx).await?;
        tx.commit().await?;
        times.push(t.elapsed());
    }
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await?;
    times.sort();
    Ok(times)
}

/// Publish hop `hop` of a chain, persistent, and wait for its confirm.
async fn publish(ch: &Channel, queue: &str, hop: u8) -> anyhow::Result<()> {
    let mut body = vec![0u8; BODY];
    body[0] = hop;
    let mut headers = FieldTable::default();
    for (k, v) in HEADERS {
        headers.insert((*k).into(), lapin::types::AMQPValue::LongString((*v).into()));
    }
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_correlation_id(uuid::Uuid::now_v7().to_string().into())
        .with_type("command".into())
        .with_reply_to("bench.replies".into())
        .with_content_type("application/json".into())
        .with_timestamp(1)
        .with_headers(headers);
    let confirm = ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, props).await?.await?;
    anyhow::ensure!(matches!(confirm, lapin::Confirmation::Ack(_)), "the broker did not confirm a publish: {confirm:?}");
    Ok(())
}
