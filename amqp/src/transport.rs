//! The AMQP side of the protocol, shared by participants and the orchestrator: the names of
//! exchanges and queues (docs/protocol.md, "Names"), declaring them, converting between lapin
//! messages and [`WireMessage`], publishing with confirms, and dead-lettering with a reason.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use sagas::SagaId;
use sagas::protocol::{H_DEAD_LETTER_DETAIL, H_DEAD_LETTER_REASON, HeaderValue, ProtocolError, WireMessage, clip};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The names of every AMQP object of one deployment, derived from its namespace (and, for the
/// replies, from how many partitions they are spread over).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    ns: String,
    partitions: u16,
}

impl Names {
    /// Names under `namespace` (`sagaflow` by default), replies in the one queue `{ns}.replies`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self { ns: namespace.into(), partitions: 0 }
    }

    /// The same names with the replies spread by saga over `partitions` queues (0: the one
    /// queue `{ns}.replies`).
    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// How many partition queues the replies are spread over (0: none, the one queue).
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// `{ns}.replies.{partition}`: one of the partition queues of the replies.
    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}.replies.{partition}", self.ns)
    }

    /// The queue the replies of `saga` go to: its partition's ([`partition_of`]), or
    /// `{ns}.replies` without partitions.
    pub fn reply_queue_for(&self, saga: SagaId) -> String {
        match self.partitions {
            0 => self.replies_queue(),
            n => self.partition_queue(partition_of(saga, n)),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `{ns}.commands`: direct exchange, routing key = participant.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.ns)
    }

    /// `{ns}.participant.{participant}`: a participant's inbox.
    pub fn participant_queue(&self, participant: &str) -> String {
        format!("{}.participant.{participant}", self.ns)
    }

    /// `{ns}.replies`: the orchestrator's reply queue.
    pub fn replies_queue(&self) -> String {
        format!("{}.replies", self.ns)
    }

    /// `{ns}.inbound`: start requests and external events.
    pub fn inbound_queue(&self) -> String {
        format!("{}.inbound", self.ns)
    }

    /// `{ns}.events`: topic exchange of lifecycle events.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.ns)
    }

    /// `{ns}.dead-letter`: direct exchange, routing key = the queue a message came from.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.ns)
    }

    /// `{queue}.dead-letter`: where `queue`'s refused messages go.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead-letter")
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new("sagaflow")
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker refused or lost the connection or channel.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker nacked a publish: it could not store the message.
    #[error("the broker did not accept a message for `{exchange}` / `{routing_key}`")]
    PublishNacked {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// A `mandatory` publish reached no queue.
    #[error("no queue is bound for `{exchange}` / `{routing_key}`: {reply_text}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's explanation.
        reply_text: String,
    },
    /// The broker did not answer within [`BROKER_WAIT`]: the connection is treated as lost.
    #[error("no answer from the broker within {secs} s while waiting for {what}", secs = BROKER_WAIT.as_secs(), what = .0)]
    NoAnswer(&'static str),
    /// The message can never be published: its properties do not fit in one AMQP frame, or its
    /// body is over [`MAX_MESSAGE_BYTES`]. Nothing was sent (the broker would close the
    /// connection, and every retry would do the same).
    #[error("the message for `{exchange}` / `{routing_key}` cannot be published: {why}")]
    TooLarge {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// Which part is too large, by how much.
        why: String,
    },
}

/// The largest message body this process publishes: RabbitMQ's default `max_message_size`
/// (16 MiB); the broker refuses a larger one by closing the channel.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The frame size negotiated with the broker (the least over this process's connections):
/// a message's properties travel in one frame and cannot be split. RabbitMQ's default until a
/// connection says otherwise.
static FRAME_MAX: AtomicU32 = AtomicU32::new(131_072);

/// The most bytes a message's properties (headers included) may take: one frame, less the
/// frame's own 8 bytes and the content header's 14.
pub fn max_properties_bytes() -> usize {
    (FRAME_MAX.load(Ordering::Relaxed) as usize).saturating_sub(8 + 14)
}

/// What `v` takes on the wire, its type tag included (an upper bound for the rare types).
fn value_size(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) | AMQPValue::Void => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) | AMQPValue::DecimalValue(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
    }
}

fn table_size(t: &FieldTable) -> usize {
    4 + t.inner().iter().map(|(k, v)| 1 + k.as_str().len() + value_size(v)).sum::<usize>()
}

/// What properties `p` take on the wire (flags, every property and the headers table).
pub fn properties_size(p: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    2 + short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, table_size)
        + 2
        + short(p.correlation_id())
        + short(p.reply_to())
        + short(p.expiration())
        + short(p.message_id())
        + 8
        + short(p.kind())
        + short(p.user_id())
        + short(p.app_id())
        + short(p.cluster_id())
}

/// `Err(why)` when a message of `props` and a body of `body_len` bytes cannot be published.
fn check_fits(props: &BasicProperties, body_len: usize) -> Result<(), String> {
    let (size, max) = (properties_size(props), max_properties_bytes());
    if size > max {
        return Err(format!("its properties take {size} bytes, over the {max} that fit in one AMQP frame"));
    }
    if body_len > MAX_MESSAGE_BYTES {
        return Err(format!("its body is {body_len} bytes, over the limit of {MAX_MESSAGE_BYTES}"));
    }
    Ok(())
}

/// How long a wait on the broker (a publisher confirm, an ack) may take. A connection that
/// died without closing cleanly can leave such a wait unanswered; bounding it keeps a handler
/// from holding its slot, and the consumer loop from waiting on it, forever.
pub const BROKER_WAIT: Duration = Duration::from_secs(30);

/// `fut`, or [`TransportError::NoAnswer`] after [`BROKER_WAIT`].
async fn within<T, E: Into<TransportError>>(what: &'static str, fut: impl Future<Output = Result<T, E>>) -> Result<T, TransportError> {
    match tokio::time::timeout(BROKER_WAIT, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(TransportError::NoAnswer(what)),
    }
}

/// Ack `d` (bounded by [`BROKER_WAIT`]).
pub async fn ack(d: &Delivery) -> Result<(), TransportError> {
    within("an ack", d.ack(BasicAckOptions::default())).await.map(drop)
}

/// Nack `d` back to its queue for redelivery (bounded by [`BROKER_WAIT`]).
pub async fn requeue(d: &Delivery) -> Result<(), TransportError> {
    within("a nack", d.nack(BasicNackOptions { requeue: true, multiple: false })).await.map(drop)
}

/// Run `handle` for every delivery of `consumer`, at most `concurrency` at once, until `token`
/// is cancelled (`Ok`) or the channel or the consumer fails (`Err`); then wait for the handlers
/// still running. The channel's state is checked every second too, so a connection lost while
/// every handler is busy is noticed. The orchestrator's consumers and the participants share it.
pub async fn run_consumer<F, Fut>(
    ch: &Channel,
    consumer: lapin::Consumer,
    concurrency: usize,
    token: &CancellationToken,
    handle: F,
) -> Result<(), lapin::Error>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_batch_consumer(ch, consumer, 1, concurrency, token, |mut batch| handle(batch.pop().expect("a batch is never empty"))).await
}

/// [`run_consumer`] for handlers of several deliveries at once: each batch holds the deliveries
/// that had arrived when a handler slot was free, up to `max_batch` (so batches are of one
/// while the consumer keeps up, and grow under load), and `concurrency` counts batches.
pub async fn run_batch_consumer<F, Fut>(
    ch: &Channel,
    mut consumer: lapin::Consumer,
    max_batch: usize,
    concurrency: usize,
    token: &CancellationToken,
    handle: F,
) -> Result<(), lapin::Error>
where
    F: Fn(Vec<Delivery>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lost = |why: &'static str| lapin::Error::from(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, why));
    let mut tasks = JoinSet::new();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            () = token.cancelled() => break Ok(()),
            _ = check.tick() => {
                if !ch.status().connected() {
                    break Err(lost("the channel to RabbitMQ is gone"));
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a delivery handler panicked; its messages will be redelivered");
                }
            }
            next = consumer.next(), if tasks.len() < concurrency => match next {
                Some(Ok(first)) => {
                    let mut batch = vec![first];
                    let mut ended = None;
                    // What has arrived already joins the batch.
                    while batch.len() < max_batch {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(d))) => batch.push(d),
                            Some(Some(Err(e))) => ended = Some(e),
                            Some(None) => ended = Some(lost("the broker cancelled the consumer")),
                            None => break,
                        }
                        if ended.is_some() {
                            break;
                        }
                    }
                    tasks.spawn(handle(batch));
                    if let Some(e) = ended {
                        break Err(e);
                    }
                }
                Some(Err(e)) => break Err(e),
                None => break Err(lost("the broker cancelled the consumer")),
            },
        }
    };
    // Every wait on the broker is bounded, so this ends even on a dead connection.
    while tasks.join_next().await.is_some() {}
    result
}

/// A URL (or a message holding one) with its passwords hidden: the one in the user part and
/// any `password=` query parameter.
pub fn redact(url: &str) -> String {
    // A list of brokers is redacted address by address.
    if url.contains(',') {
        return url.split(',').map(redact).collect::<Vec<_>>().join(",");
    }
    let out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    // Lower-casing ASCII keeps every byte where it was, so positions carry over.
    let mut rest = out.as_str();
    let mut hidden = String::with_capacity(out.len());
    while let Some(at) = rest.to_ascii_lowercase().find("password=") {
        let start = at + "password=".len();
        hidden.push_str(&rest[..start]);
        hidden.push_str("***");
        let end = rest[start..].find(['&', '#', ' ', '`', '\'', '"']).map_or(rest.len(), |e| e + start);
        rest = &rest[end..];
    }
    hidden.push_str(rest);
    hidden
}

/// How long one connection attempt (TCP, TLS and the AMQP handshake) may take: a peer that
/// accepts the TCP connection but never speaks AMQP (a broker still starting, a port reused by
/// something else) must not hang the caller.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an outage that lasts is told again at WARN while [`connect`] retries.
pub const OUTAGE_REMINDER: Duration = Duration::from_secs(60);

/// The brokers of `urls`: one URL, or several separated by commas (the nodes of a cluster).
pub fn broker_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Which broker of a list the next connection tries (plus the process id, so the processes of a
/// deployment start on different brokers), process-wide: after the one that answered last, so
/// a connection lost with its broker moves on to the next.
static NEXT_BROKER: AtomicUsize = AtomicUsize::new(0);

/// Connect to RabbitMQ, retrying with exponential backoff for up to `give_up_after`; the first
/// failure is logged at WARN, then one line a [`OUTAGE_REMINDER`], the other retries at DEBUG.
///
/// `urls` may name several brokers, separated by commas (the nodes of a cluster): each attempt
/// tries the next one, starting after the broker the process connected to last, so a
/// connection lost with its broker comes back on another.
///
/// An `amqps://` URL may name, in its query, a PEM file of CA certificates to trust besides the
/// web PKI roots: `cacertfile=/path/ca.pem` (the name RabbitMQ's URI spec gives it). A broker
/// whose certificate does not verify is refused at once, not retried ([`certificate_refused`]).
pub async fn connect(urls: &str, give_up_after: Duration) -> Result<Connection, lapin::Error> {
    let brokers: Vec<(&str, lapin::tcp::OwnedTLSConfig)> =
        broker_urls(urls).into_iter().map(|u| Ok((u, tls_config(u)?))).collect::<Result<_, lapin::Error>>()?;
    if brokers.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no RabbitMQ URL given").into());
    }
    let mut told = None;
    let attempt = || async {
        let pid = usize::try_from(std::process::id()).unwrap_or(0);
        let i = NEXT_BROKER.fetch_add(1, Ordering::Relaxed).wrapping_add(pid) % brokers.len();
        let (url, tls) = &brokers[i];
        let runtime = lapin::runtime::default_runtime()?;
        let conn = match tokio::time::timeout(
            ATTEMPT_TIMEOUT.min(give_up_after.max(Duration::from_secs(1))),
            Connection::connect_with_config(url, ConnectionProperties::default(), tls.clone(), runtime),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no AMQP handshake in time").into()),
        };
        match conn {
            // The next connection starts after this broker.
            Ok(c) => {
                if brokers.len() > 1 {
                    tracing::info!(broker = %redact(url), "connected to RabbitMQ");
                }
                Ok(c)
            }
            Err(e) if brokers.len() > 1 => Err(lapin::Error::from(std::io::Error::other(format!("{}: {e}", redact(url))))),
            Err(e) => Err(e),
        }
    };
    let conn = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(give_up_after))
                .without_max_times(),
        )
        .notify(|e, wait| {
            // An outage is told once, then every `OUTAGE_REMINDER` while it lasts: each retry
            // is a line at DEBUG only.
            let now = std::time::Instant::now();
            if told.is_none_or(|t: std::time::Instant| now.duration_since(t) >= OUTAGE_REMINDER) {
                told = Some(now);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "cannot connect to RabbitMQ; retrying");
            } else {
                tracing::debug!(error = %e, retry_in_ms = wait.as_millis(), "cannot connect to RabbitMQ; retrying");
            }
        })
        .when(|e| !certificate_refused(e))
        .await
        .map_err(|e| {
            if certificate_refused(&e) {
                let why = format!(
                    "{e}: the broker's certificate does not verify (it must chain to a web PKI root or to a CA in the URL's `cacertfile`, and name the host of the URL)"
                );
                lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, why))
            } else {
                e
            }
        })?;
    FRAME_MAX.fetch_min(conn.configuration().frame_max(), Ordering::Relaxed);
    Ok(conn)
}

/// The TLS settings of `url`: the CA certificates of the file its query names as `cacertfile`.
fn tls_config(url: &str) -> Result<lapin::tcp::OwnedTLSConfig, lapin::Error> {
    let cert_chain = ca_certificates(url).map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidData, why))?;
    Ok(lapin::tcp::OwnedTLSConfig { identity: None, cert_chain })
}

/// The PEM text of the file `url` names as `cacertfile`, if it names one; `Err` says why the file
/// cannot serve (unreadable, or no PEM certificate in it), naming the setting.
pub fn ca_certificates(url: &str) -> Result<Option<String>, String> {
    let Some(path) = query_param(url, "cacertfile") else { return Ok(None) };
    let pem = std::fs::read_to_string(&path).map_err(|e| format!("cacertfile `{path}` cannot be read: {e}"))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("cacertfile `{path}` holds no PEM certificate"));
    }
    Ok(Some(pem))
}

/// The value of query parameter `key` of `url`, percent-decoded.
pub fn query_param(url: &str, key: &str) -> Option<String> {
    let query = url.split_once('?')?.1.split('#').next()?;
    let raw = query.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    Some(percent_decode(raw, true))
}

/// `raw` (a part of a URL) percent-decoded; with `plus_is_space` (a query), `+` is a space. An
/// escape that is not one is left as it is; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(raw: &str, plus_is_space: bool) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', ..) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `e` (from lapin, or from sqlx) is rustls refusing the server's certificate: retrying
/// cannot help.
pub fn certificate_refused(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("invalid peer certificate")
}

/// How long closing a channel or a connection waits for the broker's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Close `ch` (`reason` for the broker's log), waiting at most 5 s for the broker's
/// answer: a shutdown must not hang on a connection that died without lapin noticing.
pub async fn close_channel(ch: &Channel, reason: &str) {
    if tokio::time::timeout(CLOSE_WAIT, ch.close(200, reason.into())).await.is_err() {
        tracing::warn!(reason, "closing an AMQP channel got no answer within 5 s; leaving it");
    }
}

/// Close `conn` as [`close_channel`] does a channel.
pub async fn close_connection(conn: &Connection, reason: &str) {
    if tokio::time::timeout(CLOSE_WAIT, conn.close(200, reason.into())).await.is_err() {
        tracing::warn!(reason, "closing an AMQP connection got no answer within 5 s; leaving it");
    }
}

/// A channel with publisher confirms on.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Resolves once `conn` or `ch` is no longer connected (looked at twice a second).
pub async fn closed(conn: &Connection, ch: &Channel) {
    while conn.status().connected() && ch.status().connected() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The partition, of `partitions`, whose queue takes the replies of `saga`: a jump consistent
/// hash (Lamping and Veach) of the saga id, so every process computes the same one and going
/// from n to n + 1 partitions moves only a 1/(n + 1) share of the sagas.
pub fn partition_of(saga: SagaId, partitions: u16) -> u16 {
    // Fold the id: a v7 id's high bits are its time, its low bits random.
    let (high, low) = saga.0.as_u64_pair();
    let mut key = high ^ low;
    let (mut b, mut j) = (0u64, 0u64);
    while j < u64::from(partitions) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // ((b + 1) * 2^31 / ((key >> 33) + 1)) in integers: no float rounding to disagree on.
        j = (b + 1).saturating_mul(1 << 31) / ((key >> 33) + 1);
    }
    u16::try_from(b).unwrap_or(0)
}

/// How queues are declared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Quorum queues (replicated; for RabbitMQ clusters) instead of classic queues.
    pub quorum: bool,
    /// One consumer at a time takes the queue's messages (`x-single-active-consumer`); the
    /// others wait as standbys, in the order they subscribed.
    pub single_active: bool,
    /// Deliver the messages by their AMQP `priority` (0–[`MAX_PRIORITY`], higher first): a
    /// classic queue is declared with `x-max-priority`; a quorum queue needs no argument
    /// (RabbitMQ 4.0 and later deliver priorities 5 and above first; earlier versions ignore
    /// priorities in quorum queues).
    pub priorities: bool,
}

/// The highest AMQP priority a command carries (a saga's priority, clamped to 0–9): the
/// `x-max-priority` of classic participant queues declared with [`QueueOptions::priorities`].
pub const MAX_PRIORITY: u8 = 9;

/// The AMQP priority of a command of a saga of priority `priority`: clamped to 0–[`MAX_PRIORITY`].
pub fn amqp_priority(priority: i32) -> u8 {
    u8::try_from(priority.clamp(0, i32::from(MAX_PRIORITY))).unwrap_or(0)
}

/// Declare a durable exchange (idempotent; every exchange of the protocol is durable).
pub async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(name.into(), kind, durable, FieldTable::default()).await
}

/// Declare the dead-letter exchange, `queue` with its dead-letter arguments, and its
/// dead-letter queue. Idempotent.
pub async fn declare_queue(ch: &Channel, names: &Names, queue: &str, opts: QueueOptions) -> Result<(), lapin::Error> {
    let dlx = names.dead_letter_exchange();
    declare_exchange(ch, &dlx, ExchangeKind::Direct).await?;
    let queue_args = |dead_letter: bool| {
        let mut args = FieldTable::default();
        if opts.quorum {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        if dead_letter && opts.single_active {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        if dead_letter {
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dlx.as_str().into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(queue.into()));
        }
        if dead_letter && opts.priorities && !opts.quorum {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(MAX_PRIORITY));
        }
        args
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let dlq = Names::dead_letter_queue(queue);
    ch.queue_declare(dlq.as_str().into(), durable, queue_args(false)).await?;
    ch.queue_bind(dlq.as_str().into(), dlx.as_str().into(), queue.into(), QueueBindOptions::default(), FieldTable::default()).await?;
    ch.queue_declare(queue.into(), durable, queue_args(true)).await?;
    Ok(())
}

/// Declare a participant's queue and bind it to the commands exchange.
pub async fn declare_participant(ch: &Channel, names: &Names, participant: &str, opts: QueueOptions) -> Result<(), lapin::Error> {
    let exchange = names.commands_exchange();
    declare_exchange(ch, &exchange, ExchangeKind::Direct).await?;
    let queue = names.participant_queue(participant);
    declare_queue(ch, names, &queue, opts).await?;
    ch.queue_bind(queue.as_str().into(), exchange.as_str().into(), participant.into(), QueueBindOptions::default(), FieldTable::default())
        .await
}

/// The protocol's view of a delivered message, or [`ProtocolError::Oversized`] for a body over
/// `max_body` bytes, refused before it is copied.
pub fn wire_from_delivery(d: &Delivery, max_body: usize) -> Result<WireMessage, ProtocolError> {
    if d.data.len() > max_body {
        return Err(ProtocolError::Oversized { size: d.data.len(), max: max_body });
    }
    Ok(wire_from_parts(&d.properties, &d.data))
}

/// The protocol's view of one header of a delivered message, without copying the rest of it.
pub fn delivery_header(d: &Delivery, name: &str) -> Option<HeaderValue> {
    header_value(d.properties.headers().as_ref()?.inner().get(name)?)
}

/// An AMQP header value as the protocol sees it. Other types (tables, arrays, floats) are not
/// part of the protocol: `None`, and decoders that need the header report it as missing.
fn header_value(v: &AMQPValue) -> Option<HeaderValue> {
    Some(match v {
        AMQPValue::LongString(s) => HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => HeaderValue::Int(*n),
        AMQPValue::LongInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        _ => return None,
    })
}

fn wire_from_parts(p: &BasicProperties, body: &[u8]) -> WireMessage {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let mut headers = BTreeMap::new();
    if let Some(table) = p.headers() {
        for (k, v) in table {
            if let Some(value) = header_value(v) {
                headers.insert(k.as_str().to_owned(), value);
            }
        }
    }
    WireMessage {
        message_id: s(p.message_id()),
        correlation_id: s(p.correlation_id()),
        kind: s(p.kind()),
        reply_to: s(p.reply_to()),
        content_type: s(p.content_type()),
        timestamp: *p.timestamp(),
        priority: *p.priority(),
        headers,
        body: body.to_vec(),
    }
}

/// AMQP properties for `msg`, persistent.
pub fn properties(msg: &WireMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &msg.headers {
        let value = match v {
            HeaderValue::Int(n) => AMQPValue::LongLongInt(*n),
            HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        };
        headers.insert(k.as_str().into(), value);
    }
    let mut p = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    if let Some(v) = &msg.message_id {
        p = p.with_message_id(v.as_str().into());
    }
    if let Some(v) = &msg.correlation_id {
        p = p.with_correlation_id(v.as_str().into());
    }
    if let Some(v) = &msg.kind {
        p = p.with_type(v.as_str().into());
    }
    if let Some(v) = &msg.reply_to {
        p = p.with_reply_to(v.as_str().into());
    }
    if let Some(v) = &msg.content_type {
        p = p.with_content_type(v.as_str().into());
    }
    if let Some(v) = msg.timestamp {
        p = p.with_timestamp(v);
    }
    if let Some(v) = msg.priority {
        p = p.with_priority(v);
    }
    p
}

/// Publish `msg` and hand back the pending confirmation, so a caller can pipeline many
/// publishes before waiting. `ch` must be a [`confirm_channel`]. A message that can never be
/// published ([`TransportError::TooLarge`]) is not sent.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    msg: &WireMessage,
    mandatory: bool,
) -> Result<PendingConfirm, TransportError> {
    let options = BasicPublishOptions { mandatory, immediate: false };
    let props = properties(msg);
    if let Err(why) = check_fits(&props, msg.body.len()) {
        return Err(TransportError::TooLarge { exchange: exchange.to_owned(), routing_key: routing_key.to_owned(), why });
    }
    let confirm = within("a publish", ch.basic_publish(exchange.into(), routing_key.into(), options, &msg.body, props)).await?;
    Ok(PendingConfirm { confirm, exchange: exchange.to_owned(), routing_key: routing_key.to_owned(), message_id: msg.message_id.clone() })
}

/// A publish waiting for the broker's confirm.
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
}

/// A message the broker returned (a `mandatory` publish that reached no queue): its id and
/// the broker's explanation.
type Returned = (Option<String>, String);

impl PendingConfirm {
    /// Wait for the broker: `Ok` once it stored (or, not `mandatory`, accepted) the message.
    pub async fn wait(self) -> Result<(), TransportError> {
        let (exchange, routing_key, id) = (self.exchange.clone(), self.routing_key.clone(), self.message_id.clone());
        match self.settle().await? {
            Some((returned, reply_text)) if returned == id => Err(TransportError::Unroutable { exchange, routing_key, reply_text }),
            _ => Ok(()),
        }
    }

    /// The confirm, and the returned message it carries. lapin hands a returned message to
    /// whichever confirm the broker's next ack completes, and one ack may complete several
    /// publishes (`multiple`): the message a return belongs to is known by its id, not by
    /// the confirm that carried it.
    async fn settle(self) -> Result<Option<Returned>, TransportError> {
        match within("a publisher confirm", self.confirm).await? {
            lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => Ok(None),
            lapin::Confirmation::Ack(Some(ret)) => {
                Ok(Some((ret.properties.message_id().as_ref().map(|m| m.as_str().to_owned()), ret.reply_text.as_str().to_owned())))
            }
            lapin::Confirmation::Nack(_) => Err(TransportError::PublishNacked { exchange: self.exchange, routing_key: self.routing_key }),
        }
    }
}

/// Publish `messages` (exchange, routing key, message, mandatory) pipelined, then wait for the
/// confirms: one result per message, in order. A message is [`TransportError::Unroutable`]
/// when the broker returned a message of its id, whichever confirm carried the return; so
/// that every return of a batch is carried by a confirm of the same batch, a channel must
/// have one batch in flight at a time. Once the broker leaves a confirm unanswered
/// ([`TransportError::NoAnswer`]), the rest are not waited for and fail the same way, so a
/// dead connection costs one [`BROKER_WAIT`], not one per message.
pub async fn publish_batch(ch: &Channel, messages: Vec<(&str, &str, &WireMessage, bool)>) -> Vec<Result<(), TransportError>> {
    let mut pending = Vec::new();
    let mut gone = false;
    for (exchange, routing_key, msg, mandatory) in messages {
        let p = if gone { Err(TransportError::NoAnswer("a publish")) } else { publish(ch, exchange, routing_key, msg, mandatory).await };
        gone = matches!(p, Err(TransportError::NoAnswer(_)));
        pending.push(p);
    }
    let mut settled = Vec::with_capacity(pending.len());
    let mut returned: Vec<Returned> = Vec::new();
    for p in pending {
        let r = match p {
            _ if gone => Err(TransportError::NoAnswer("a publisher confirm")),
            Ok(p) => {
                let (exchange, routing_key, id) = (p.exchange.clone(), p.routing_key.clone(), p.message_id.clone());
                p.settle().await.map(|ret| {
                    returned.extend(ret);
                    (exchange, routing_key, id)
                })
            }
            Err(e) => Err(e),
        };
        gone = matches!(r, Err(TransportError::NoAnswer(_)));
        settled.push(r);
    }
    settled
        .into_iter()
        .map(|r| {
            let (exchange, routing_key, id) = r?;
            match returned.iter().position(|(returned, _)| *returned == id) {
                Some(i) => Err(TransportError::Unroutable { exchange, routing_key, reply_text: returned.swap_remove(i).1 }),
                None => Ok(()),
            }
        })
        .collect()
}

/// Publish and wait for the confirm.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    msg: &WireMessage,
    mandatory: bool,
) -> Result<(), TransportError> {
    publish(ch, exchange, routing_key, msg, mandatory).await?.wait().await
}

/// Most bytes of `x-dead-letter-detail`: a detail never repeats a large value whole.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// String headers longer than this are cut in a dead letter that would not fit in a frame.
const TRIMMED_HEADER_BYTES: usize = 256;
/// Header on a dead letter whose headers had to be cut to fit: the names of those headers.
pub const H_DEAD_LETTER_TRIMMED: &str = "x-dead-letter-trimmed";

/// Refuse a delivery: republish it to the dead-letter exchange (routing key = the queue it
/// came from) with `x-dead-letter-reason` and `x-dead-letter-detail`, wait for the confirm,
/// then ack the original. Logs the refusal once.
pub async fn dead_letter(ch: &Channel, names: &Names, queue: &str, d: &Delivery, reason: &str, detail: &str) -> Result<(), TransportError> {
    tracing::warn!(queue, reason, detail = %clip(detail, MAX_DETAIL_BYTES), message.id = ?d.properties.message_id().as_ref().map(ShortString::as_str), "dead-lettering a message");
    publish_dead_letter(ch, names, queue, &d.properties, &d.data, reason, detail).await?;
    ack(d).await
}

/// Publish a message of `props` and `body` to the dead-letter exchange (routing key `queue`)
/// with the reason and the detail (cut to [`MAX_DETAIL_BYTES`]), and wait for the confirm. The
/// message is republished unchanged, unless its headers with the two added would not fit in
/// one frame: then every string header over 256 bytes is cut, and `x-dead-letter-trimmed`
/// names them. A dead letter can always be published.
pub async fn publish_dead_letter(
    ch: &Channel,
    names: &Names,
    queue: &str,
    props: &BasicProperties,
    body: &[u8],
    reason: &str,
    detail: &str,
) -> Result<(), TransportError> {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(H_DEAD_LETTER_REASON.into(), AMQPValue::LongString(clip(reason, MAX_DETAIL_BYTES).as_ref().into()));
    headers.insert(H_DEAD_LETTER_DETAIL.into(), AMQPValue::LongString(clip(detail, MAX_DETAIL_BYTES).as_ref().into()));
    let mut props = props.clone().with_headers(headers.clone());
    if properties_size(&props) > max_properties_bytes() {
        let mut trimmed = Vec::new();
        let mut cut = FieldTable::default();
        for (k, v) in headers.inner() {
            let v = match v {
                AMQPValue::LongString(s) if s.as_bytes().len() > TRIMMED_HEADER_BYTES => {
                    trimmed.push(k.as_str().to_owned());
                    AMQPValue::LongString(clip(&String::from_utf8_lossy(s.as_bytes()), TRIMMED_HEADER_BYTES).as_ref().into())
                }
                // Nested tables and arrays are not part of the protocol: dropped when too large.
                AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) | AMQPValue::ByteArray(_) if value_size(v) > TRIMMED_HEADER_BYTES => {
                    trimmed.push(k.as_str().to_owned());
                    continue;
                }
                other => other.clone(),
            };
            cut.insert(k.clone(), v);
        }
        cut.insert(H_DEAD_LETTER_TRIMMED.into(), AMQPValue::LongString(clip(&trimmed.join(","), MAX_DETAIL_BYTES).as_ref().into()));
        props = props.with_headers(cut);
        if properties_size(&props) > max_properties_bytes() {
            // Still too many headers: keep the reason and what was cut, nothing else of them.
            let mut only = FieldTable::default();
            for k in [H_DEAD_LETTER_REASON, H_DEAD_LETTER_DETAIL, H_DEAD_LETTER_TRIMMED] {
                if let Some(v) = props.headers().as_ref().and_then(|h| h.inner().get(k)) {
                    only.insert(k.into(), v.clone());
                }
            }
            props = props.with_headers(only);
        }
    }
    let exchange = names.dead_letter_exchange();
    let confirm =
        within("a publish", ch.basic_publish(exchange.as_str().into(), queue.into(), BasicPublishOptions::default(), body, props)).await?;
    PendingConfirm { confirm, exchange, routing_key: queue.to_owned(), message_id: None }.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<SagaId> {
        (0..n).map(|_| SagaId::new()).collect()
    }

    #[test]
    fn sagas_spread_evenly_over_the_partitions_and_few_move_when_one_is_added() {
        let sagas = ids(20_000);
        let mut counts = [0usize; 8];
        for s in &sagas {
            counts[usize::from(partition_of(*s, 8))] += 1;
        }
        // 2,500 each on average.
        assert!(counts.iter().all(|&c| (2_200..=2_800).contains(&c)), "{counts:?}");
        // From 8 to 9 partitions about 1/9 of the sagas move, all of them to the new one.
        let moved: Vec<u16> = sagas.iter().map(|s| partition_of(*s, 9)).filter(|&p| p == 8).collect();
        let changed = sagas.iter().filter(|s| partition_of(**s, 8) != partition_of(**s, 9)).count();
        assert_eq!(changed, moved.len(), "a saga that moves goes to the new partition");
        assert!((1_900..=2_600).contains(&changed), "{changed} of 20,000 moved");
        assert!(sagas.iter().all(|s| partition_of(*s, 1) == 0 && partition_of(*s, 0) == 0));
    }

    #[test]
    fn the_replies_queue_of_a_saga_follows_the_partitions() {
        let saga = SagaId::new();
        assert_eq!(Names::new("shop").reply_queue_for(saga), "shop.replies");
        let names = Names::new("shop").with_partitions(4);
        assert_eq!(names.reply_queue_for(saga), format!("shop.replies.{}", partition_of(saga, 4)));
        assert_eq!(names.reply_queue_for(saga), names.reply_queue_for(saga));
    }
}
