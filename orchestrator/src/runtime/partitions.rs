//! Reply partitions (config `partitions`): the replies of a saga go to one of n queues
//! (`{ns}.replies.{k}`, chosen by [`sagaflow_amqp::transport::partition_of`] when its commands are
//! written; its events from the inbound queue are forwarded there by `consumers`), each declared
//! single-active-consumer, and the nodes share the queues out among themselves. Each node writes its row in `sagaflow.nodes` every [`TICK`] and reads which nodes
//! are alive (a row written in the last [`GONE_AFTER`]); the partitions are dealt out evenly,
//! each to the live node that scores it highest among those short of their share ([`assign`],
//! rendezvous hashing), so all nodes agree without talking, and a node joining or leaving moves
//! few partitions besides its own. A node consumes
//! the partitions it owns and releases the others (it finishes their in-flight replies, then
//! cancels). The broker's single active consumer makes sure a queue is never taken by two nodes
//! at once, even while their views of who is alive differ: a new owner's consumer waits as a
//! standby until the old one lets go. A node that stops deletes its row, so the others take its
//! partitions at their next tick; one killed leaves its queues without a consumer until its row
//! is [`GONE_AFTER`] old. Its replies wait in the queue meanwhile: nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use sagaflow_amqp::transport;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::consumers::{Consumer, Queue};

/// How often a node writes its row and looks at who else is alive.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// A node whose row is older than this is gone; its partitions go to the others.
pub(crate) const GONE_AFTER: Duration = Duration::from_secs(5);

/// Write this node's row (alive now, consuming `$2`) and read the other live nodes.
const HEARTBEAT: &str = "\
    WITH me AS ( \
        INSERT INTO sagaflow.nodes (node_id, seen_at, partitions) VALUES ($1, now(), $2) \
        ON CONFLICT (node_id) DO UPDATE SET seen_at = now(), partitions = $2 \
    ) \
    SELECT node_id FROM sagaflow.nodes WHERE node_id <> $1 AND seen_at > now() - make_interval(secs => $3)";

/// A node that stops leaves.
const LEAVE: &str = "DELETE FROM sagaflow.nodes WHERE node_id = $1";

/// The partitions, of `partitions`, that node `me` owns while `nodes` (`me` among them) are
/// alive: each partition goes to the node that scores it highest (rendezvous hashing) among those
/// that do not hold their share yet (⌊partitions / nodes⌋ each, one more for the first
/// `partitions mod nodes` to reach it), taking the partitions in order. Every node computes the same from the same list; the shares differ by one at most; a
/// node joining or leaving moves few partitions besides its own.
pub(crate) fn assign(partitions: u16, nodes: &[String], me: &str) -> Vec<u16> {
    let mut nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        return Vec::new();
    }
    // Each node holds `share` partitions, and `extra` of them one more.
    let (share, mut extra) = (usize::from(partitions) / nodes.len(), usize::from(partitions) % nodes.len());
    let mut held = vec![0usize; nodes.len()];
    let mut mine = Vec::new();
    for p in 0..partitions {
        let room = |i: usize| held[i] < share || (held[i] == share && extra > 0);
        let owner = (0..nodes.len()).filter(|&i| room(i)).max_by_key(|&i| (score(nodes[i], p), nodes[i]));
        if let Some(i) = owner {
            if held[i] == share {
                extra -= 1;
            }
            held[i] += 1;
            if nodes[i] == me {
                mine.push(p);
            }
        }
    }
    mine
}

/// Node `node`'s score for partition `p`: FNV-1a of both, mixed (splitmix64's finalizer).
/// Stable across processes, builds and Rust versions: every node computes the same.
fn score(node: &str, p: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(p.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Take this node's share of the `partitions` reply queues on `conn` with `consumer`, following
/// who is alive, until `stop`; then release them all and leave. An error when a partition's
/// consumer fails or ends on its own (the connection is in trouble: the caller reconnects).
pub(crate) async fn run(
    consumer: Consumer,
    conn: Arc<Connection>,
    pool: PgPool,
    node_id: String,
    partitions: u16,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Each partition taken, with the number of its consumer (a partition released and taken
    // again has a new one while the old one may still be finishing) and what stops it.
    let mut owned: BTreeMap<u16, (u64, CancellationToken)> = BTreeMap::new();
    let mut consumers: JoinSet<(u16, u64, anyhow::Result<()>)> = JoinSet::new();
    let mut started = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = 'run: loop {
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            Some(done) = consumers.join_next(), if !consumers.is_empty() => match done {
                Ok((p, n, Ok(()))) if owned.get(&p).is_some_and(|(current, _)| *current == n) => {
                    break Err(anyhow::anyhow!("the consumer of reply partition {p} stopped"));
                }
                // A consumer of a partition this node released has let go.
                Ok((_, _, Ok(()))) => {}
                Ok((p, _, Err(e))) => break Err(e.context(format!("reply partition {p}"))),
                Err(e) => break Err(anyhow::anyhow!("a reply partition's consumer panicked: {e}")),
            },
            _ = tick.tick() => {
                let consuming: Vec<i32> = owned.keys().map(|&p| i32::from(p)).collect();
                let others: Vec<String> = match sqlx::query_scalar(HEARTBEAT)
                    .bind(&node_id)
                    .bind(&consuming)
                    .bind(GONE_AFTER.as_secs_f64())
                    .fetch_all(&pool)
                    .await
                {
                    Ok(others) => others,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot write this node's row or read the others; keeping the reply partitions it has");
                        continue;
                    }
                };
                let mut nodes = others;
                nodes.push(node_id.clone());
                let want = assign(partitions, &nodes, &node_id);
                if want.iter().copied().eq(owned.keys().copied()) {
                    continue;
                }
                for p in owned.keys().copied().filter(|p| !want.contains(p)).collect::<Vec<_>>() {
                    if let Some((_, t)) = owned.remove(&p) {
                        t.cancel();
                    }
                }
                let gained: Vec<u16> = want.iter().copied().filter(|p| !owned.contains_key(p)).collect();
                for p in gained {
                    let ch = match transport::confirm_channel(&conn).await {
                        Ok(ch) => ch,
                        Err(e) => break 'run Err(anyhow::anyhow!("opening a channel for reply partition {p}: {e}")),
                    };
                    started += 1;
                    let (n, t, c) = (started, stop.child_token(), consumer.clone());
                    owned.insert(p, (n, t.clone()));
                    consumers.spawn(async move { (p, n, c.run(ch, Queue::Partition(p), t).await) });
                }
                tracing::info!(nodes = nodes.len(), partitions = ?want, of = partitions, "taking these reply partitions");
            }
        }
    };
    // Release every partition: in-flight replies commit and ack, then the consumers cancel.
    for (_, t) in owned.values() {
        t.cancel();
    }
    while consumers.join_next().await.is_some() {}
    if let Err(e) = sqlx::query(LEAVE).bind(&node_id).execute(&pool).await {
        tracing::warn!(error = %e, "cannot delete this node's row; the others take its reply partitions once it is old");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn every_partition_has_one_owner_shares_differ_by_one_and_few_move() {
        for k in 1..=5 {
            for partitions in [1, 2, 4, 7, 64] {
                let live = nodes(k);
                let mut owners = vec![0; usize::from(partitions)];
                let mut shares = Vec::new();
                for n in &live {
                    let mine = assign(partitions, &live, n);
                    shares.push(mine.len());
                    for p in mine {
                        owners[usize::from(p)] += 1;
                    }
                }
                assert!(owners.iter().all(|&o| o == 1), "{k} nodes, {partitions} partitions: {owners:?}");
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{k} nodes, {partitions}: {shares:?}");
            }
        }
        // When node-2 of four leaves, most partitions stay where they were.
        let (four, three) = (nodes(4), vec!["node-0".to_owned(), "node-1".to_owned(), "node-3".to_owned()]);
        let kept: usize = three.iter().map(|n| assign(64, &four, n).iter().filter(|p| assign(64, &three, n).contains(p)).count()).sum();
        assert!(kept >= 40, "{kept} of the 48 partitions the three held stayed");
        // The order nodes are listed in does not matter.
        let reversed: Vec<String> = four.iter().rev().cloned().collect();
        assert_eq!(assign(64, &four, "node-1"), assign(64, &reversed, "node-1"));
        assert_eq!(assign(4, &[], "x"), Vec::<u16>::new());
        assert_eq!(assign(0, &nodes(2), "node-0"), Vec::<u16>::new());
    }
}
