//! Runtime configuration: plain serde data with documented defaults, read from a TOML file and
//! `SAGAFLOW_*` environment variables (the binary does the reading), checked by [`Config::validate`].

use std::time::Duration;

pub use sagaflow_amqp::transport::redact;
use serde::{Deserialize, Serialize};

/// Everything a node needs. Each field's default is in its comment; each has an environment
/// variable `SAGAFLOW_<FIELD>` (upper case) that overrides the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ URL (`amqp://` or `amqps://` for TLS). Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: String,
    /// PostgreSQL URL (`postgres://`; add `?sslmode=require` for TLS). Default `postgres://postgres@127.0.0.1:5432/postgres`.
    pub database_url: String,
    /// Prefix of every AMQP name, so deployments can share a broker. Default `sagaflow`.
    pub namespace: String,
    /// This node's name in the history. Default: `<hostname>-<pid>`.
    pub node_id: String,
    /// Largest message body accepted; larger ones are dead-lettered. Default 1048576.
    pub max_body_bytes: usize,
    /// Unacked messages the broker may send ahead per consumer; replies that arrived together
    /// are applied together, so this bounds the batches too. Default 512.
    pub prefetch: u16,
    /// Inputs (or batches of replies) applied at once per consumer. Default 8.
    pub concurrency: usize,
    /// Most replies applied together (one read, one write): the replies that arrived while
    /// every slot was busy. Default 128.
    pub batch_max: usize,
    /// Declare quorum queues instead of classic ones. Default false.
    pub quorum_queues: bool,
    /// Declare the participants' queues as priority queues (classic: `x-max-priority` 9), so
    /// commands of sagas of a higher priority are delivered first. Must match the
    /// participants'; an existing queue cannot change (delete it when drained). Default false.
    pub priority_queues: bool,
    /// Spread the replies by saga over this many queues (`{ns}.replies.0` …), each taken by one
    /// node at a time, so a saga's replies reach one node, in order, and its batches never
    /// conflict with another node's; the nodes share the partitions out among themselves. 0
    /// keeps the one queue `{ns}.replies` every node takes from. At most 1024. Default 0.
    pub partitions: u16,
    /// Declare every participant's queue at start, so commands wait for a participant that is
    /// not running yet. Default true.
    pub declare_participant_queues: bool,
    /// Outbox rows published per relay round. Default 256.
    pub relay_batch: u32,
    /// Relay poll interval when no notification arrives, in ms. Default 1000.
    pub relay_poll_ms: u64,
    /// Timer poll interval, in ms. Default 100.
    pub timer_poll_ms: u64,
    /// Due timers claimed per round. Default 256.
    pub timer_batch: u32,
    /// Database connections in the pool. Default 16.
    pub database_max_connections: u32,
    /// How long to keep retrying to reach RabbitMQ or PostgreSQL at start, in s. Default 60.
    pub connect_timeout_s: u64,
    /// Publish step-level lifecycle events too (`step_started`, `step_completed`,
    /// `step_retrying`, `step_failed`, `step_skipped`, `step_compensated`), not only the saga-level
    /// ones. They cost an outbox row and a message each; the history has them anyway. Default false.
    pub step_events: bool,
    /// Also publish the `started` lifecycle event (whoever started the saga knows it started).
    /// It costs an outbox row and a message per saga; the history has it anyway. Default false.
    pub started_events: bool,
    /// Delete sagas that finished (completed or compensated) more than this many days ago, with
    /// their history, and inbox entries as old; 0 keeps everything. Default 0.
    pub retention_days: u32,
    /// Address of the HTTP API, web page and `/metrics`; empty to serve none. Default `127.0.0.1:8080`.
    pub api_addr: String,
    /// Most clients waiting at once on this node for sagas to settle (`GET /sagas/{id}/wait`);
    /// beyond it a wait is refused with 503 and `Retry-After`. Default 10000.
    pub max_waiters: usize,
    /// Bearer token every API route but `/health` and `/ready` requires: at least 16
    /// characters, printable ASCII without spaces. Required when `api_addr` is not a loopback
    /// address. Default empty.
    pub api_token: String,
}

/// Most reply partitions (each is a queue and, on the node that takes it, a consumer).
pub const MAX_PARTITIONS: u16 = 1024;

/// Shortest `api_token` accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

/// `SAGAFLOW_*` variables that are not configuration keys but belong to the project: the CLI's
/// config file, and the test harness's and example participants' own settings.
const OTHER_VARIABLES: [&str; 3] = ["SAGAFLOW_CONFIG", "SAGAFLOW_PYTHON", "SAGAFLOW_HTTP_PORT"];
const OTHER_PREFIXES: [&str; 2] = ["SAGAFLOW_TEST_", "SAGAFLOW_CHAOS_"];

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            database_url: sagaflow_amqp::pg::LOCAL_DATABASE_URL.into(),
            namespace: "sagaflow".into(),
            node_id: String::new(),
            max_body_bytes: sagas::protocol::DEFAULT_MAX_BODY_BYTES,
            prefetch: 512,
            concurrency: 8,
            batch_max: 128,
            quorum_queues: false,
            priority_queues: false,
            partitions: 0,
            declare_participant_queues: true,
            relay_batch: 256,
            relay_poll_ms: 1000,
            timer_poll_ms: 100,
            timer_batch: 256,
            database_max_connections: 16,
            connect_timeout_s: 60,
            step_events: false,
            started_events: false,
            retention_days: 0,
            api_addr: "127.0.0.1:8080".into(),
            api_token: String::new(),
            max_waiters: 10_000,
        }
    }
}

/// A configuration that cannot work, with what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Read `file` (TOML) if given, then apply `SAGAFLOW_*` variables from `env`.
    pub fn load(file: Option<&str>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut value = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read {path}: {e}")))?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError(format!("{path}: {e}")))?
            }
            None => toml::Table::new(),
        };
        let known = serde_json::to_value(Config::default()).unwrap_or_default();
        for (k, v) in env {
            let Some(field) = k.strip_prefix("SAGAFLOW_").map(str::to_lowercase) else { continue };
            let Some(default) = known.get(&field) else {
                if OTHER_VARIABLES.contains(&k.as_str()) || OTHER_PREFIXES.iter().any(|p| k.starts_with(p)) {
                    continue;
                }
                // A misspelt variable must not silently leave its setting at the default.
                let keys = known.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
                let hint = closest(&field, &keys).map(|f| format!("; did you mean SAGAFLOW_{}?", f.to_uppercase())).unwrap_or_default();
                return Err(ConfigError(format!("{k} is not a setting{hint} (docs/configuration.md lists them)")));
            };
            let parsed = match default {
                serde_json::Value::Bool(_) => v.parse::<bool>().map(toml::Value::Boolean).map_err(|e| e.to_string()),
                serde_json::Value::Number(_) => v.parse::<i64>().map(toml::Value::Integer).map_err(|e| e.to_string()),
                _ => Ok(toml::Value::String(v.clone())),
            };
            let parsed = parsed.map_err(|e| ConfigError(format!("{k}=`{v}`: {e}")))?;
            value.insert(field, parsed);
        }
        let mut cfg: Config = value.try_into().map_err(|e: toml::de::Error| ConfigError(e.to_string()))?;
        if cfg.node_id.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "node".into());
            cfg.node_id = format!("{host}-{}", std::process::id());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every field; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        check_amqp_url(&self.amqp_url).map_err(|e| ConfigError(format!("amqp_url `{}`: {e}", redact(&self.amqp_url))))?;
        check_database_url(&self.database_url).map_err(|e| ConfigError(format!("database_url `{}`: {e}", redact(&self.database_url))))?;
        if self.namespace.is_empty() || !self.namespace.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return bad(format!("namespace `{}` must be non-empty ASCII letters, digits, `_`, `-` or `.`", self.namespace));
        }
        for (name, v) in [
            ("prefetch", u64::from(self.prefetch)),
            ("concurrency", self.concurrency as u64),
            ("batch_max", self.batch_max as u64),
            ("relay_batch", u64::from(self.relay_batch)),
            ("timer_batch", u64::from(self.timer_batch)),
            ("relay_poll_ms", self.relay_poll_ms),
            ("timer_poll_ms", self.timer_poll_ms),
            ("database_max_connections", u64::from(self.database_max_connections)),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_waiters", self.max_waiters as u64),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.partitions > MAX_PARTITIONS {
            return bad(format!("partitions must be at most {MAX_PARTITIONS} (it is {})", self.partitions));
        }
        if !self.api_token.is_empty() && (self.api_token.len() < MIN_TOKEN_CHARS || !self.api_token.bytes().all(|b| b.is_ascii_graphic())) {
            return bad(format!(
                "api_token must be at least {MIN_TOKEN_CHARS} characters of printable ASCII without spaces (e.g. `openssl rand -hex 24`)"
            ));
        }
        if !self.api_addr.is_empty() {
            let addr: std::net::SocketAddr = self
                .api_addr
                .parse()
                .map_err(|e| ConfigError(format!("api_addr `{}` is not an address like 127.0.0.1:8080: {e}", self.api_addr)))?;
            if !addr.ip().is_loopback() && self.api_token.is_empty() {
                return bad(format!(
                    "api_addr {addr} is reachable from other hosts: set api_token (SAGAFLOW_API_TOKEN) to protect the API"
                ));
            }
        }
        Ok(())
    }

    /// [`connect_timeout_s`](Self::connect_timeout_s) as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_s)
    }
}

/// Whether `urls` (one AMQP URL, or several separated by commas) can be connected to: each with
/// the scheme, a host, and query parameters of the right types (`heartbeat`, `frame_max`, …),
/// checked at start instead of failing every connection attempt.
pub fn check_amqp_url(urls: &str) -> Result<(), String> {
    let brokers = sagaflow_amqp::transport::broker_urls(urls);
    if brokers.is_empty() {
        return Err("names no broker".into());
    }
    brokers.into_iter().try_for_each(check_one_amqp_url)
}

/// One broker's URL, checked as [`check_amqp_url`] says.
fn check_one_amqp_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("amqp://").or_else(|| url.strip_prefix("amqps://")) else {
        return Err("must start with amqp:// or amqps://".into());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() || host.starts_with(':') {
        return Err("names no host".into());
    }
    url.parse::<lapin::uri::AMQPUri>().map_err(|e| redact(&e))?;
    if let Some(path) = sagaflow_amqp::transport::query_param(url, "cacertfile")
        && url.starts_with("amqp://")
    {
        return Err(format!("names `cacertfile={path}` but is not amqps://: the CA would not be used"));
    }
    sagaflow_amqp::transport::ca_certificates(url).map(drop)
}

/// Whether `urls` (one PostgreSQL URL, or a primary and its standbys separated by commas) can be
/// connected to: each with the scheme, and `sslmode` and the other parameters parsing, checked
/// at start.
pub fn check_database_url(urls: &str) -> Result<(), String> {
    let servers = sagaflow_amqp::pg::database_urls(urls);
    if servers.is_empty() {
        return Err("names no server".into());
    }
    for url in servers {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must start with postgres:// or postgresql://".into());
        }
        url.parse::<sqlx::postgres::PgConnectOptions>().map(drop).map_err(|e| redact(&e.to_string()))?;
    }
    Ok(())
}

/// The key of `keys` nearest to `field` by edit distance, if near enough to be a typo.
fn closest<'k>(field: &str, keys: &'k [String]) -> Option<&'k str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    };
    keys.iter().map(|k| (distance(field, k), k)).filter(|(d, k)| *d <= 3.max(k.len() / 4)).min().map(|(_, k)| k.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn environment_overrides_defaults_and_bad_values_are_named() {
        let cfg = Config::load(
            None,
            env(&[("SAGAFLOW_NAMESPACE", "shop"), ("SAGAFLOW_PREFETCH", "8"), ("SAGAFLOW_QUORUM_QUEUES", "true"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!((cfg.namespace.as_str(), cfg.prefetch, cfg.quorum_queues), ("shop", 8, true));
        assert!(!cfg.node_id.is_empty());

        let err = Config::load(None, env(&[("SAGAFLOW_PREFETCH", "lots")])).unwrap_err().to_string();
        assert!(err.contains("SAGAFLOW_PREFETCH"), "{err}");
        let err = Config::load(None, env(&[("SAGAFLOW_AMQP_URL", "http://user:secret@h")])).unwrap_err().to_string();
        assert!(err.contains("amqp_url") && !err.contains("secret"), "{err}");
        let err = Config::load(None, env(&[("SAGAFLOW_CONCURRENCY", "0")])).unwrap_err().to_string();
        assert!(err.contains("concurrency must be at least 1"), "{err}");
        let err = Config::load(None, env(&[("SAGAFLOW_NAMESPACE", "a b")])).unwrap_err().to_string();
        assert!(err.contains("namespace"), "{err}");
        // The API refuses to listen beyond this host without a token.
        let err = Config::load(None, env(&[("SAGAFLOW_API_ADDR", "0.0.0.0:8080")])).unwrap_err().to_string();
        assert!(err.contains("set api_token"), "{err}");
        let token = "0123456789abcdef0123";
        let ok = Config::load(None, env(&[("SAGAFLOW_API_ADDR", "0.0.0.0:8080"), ("SAGAFLOW_API_TOKEN", token)])).unwrap();
        assert_eq!(ok.api_token, token);
        // A token one could guess, or one with blanks that a header would not carry, is refused.
        for weak in ["t", " ", "short-token", "0123456789abcdef 0123"] {
            let err = Config::load(None, env(&[("SAGAFLOW_API_TOKEN", weak)])).unwrap_err().to_string();
            assert!(err.contains("api_token must be at least 16 characters"), "{weak:?}: {err}");
        }
        let err = Config::load(None, env(&[("SAGAFLOW_API_ADDR", "localhost")])).unwrap_err().to_string();
        assert!(err.contains("api_addr"), "{err}");
    }

    #[test]
    fn a_misspelt_variable_stops_the_node_with_a_suggestion() {
        let err = Config::load(None, env(&[("SAGAFLOW_API_TOKN", "0123456789abcdef0123")])).unwrap_err().to_string();
        assert!(err.contains("SAGAFLOW_API_TOKN is not a setting; did you mean SAGAFLOW_API_TOKEN?"), "{err}");
        let err = Config::load(None, env(&[("SAGAFLOW_WHATEVER", "1")])).unwrap_err().to_string();
        assert!(err.contains("SAGAFLOW_WHATEVER is not a setting (docs/configuration.md"), "{err}");
        // The project's other variables are not settings, and are not refused.
        let others = [("SAGAFLOW_CONFIG", "x.toml"), ("SAGAFLOW_TEST_AMQP_URL", "amqp://h"), ("SAGAFLOW_CHAOS_SEED", "1")];
        Config::load(None, env(&others)).unwrap();
    }

    #[test]
    fn partitions_are_bounded() {
        assert_eq!(Config::load(None, env(&[("SAGAFLOW_PARTITIONS", "16")])).unwrap().partitions, 16);
        let err = Config::load(None, env(&[("SAGAFLOW_PARTITIONS", "1025")])).unwrap_err().to_string();
        assert!(err.contains("partitions must be at most 1024"), "{err}");
        let err = Config::load(None, env(&[("SAGAFLOW_PARTITIONS", "-1")])).unwrap_err().to_string();
        assert!(err.contains("partitions"), "{err}");
    }

    #[test]
    fn urls_are_checked_at_start_and_passwords_never_shown() {
        for (url, why) in [
            ("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=abc", "heartbeat"),
            ("amqp://", "names no host"),
            ("amqp://guest:secret@:5672/", "names no host"),
            ("amqp://guest:secret@h/?frame_max=-1", "frame_max"),
            ("amqps://guest:secret@h/?cacertfile=/nonexistent/ca.pem", "cacertfile `/nonexistent/ca.pem` cannot be read"),
            ("amqp://guest:secret@h/?cacertfile=%2Fetc%2Fhostname", "is not amqps://"),
            ("amqps://guest:secret@h/?cacertfile=%2Fetc%2Fhostname", "holds no PEM certificate"),
        ] {
            let err = Config::load(None, env(&[("SAGAFLOW_AMQP_URL", url)])).unwrap_err().to_string();
            assert!(err.contains("amqp_url") && err.contains(why) && !err.contains("secret"), "{url}: {err}");
        }
        // A cluster: several brokers, each checked.
        let cluster = "amqp://guest:secret@h1:5672/%2f, amqp://guest:secret@h2:5672/%2f";
        assert_eq!(Config::load(None, env(&[("SAGAFLOW_AMQP_URL", cluster)])).unwrap().amqp_url, cluster);
        for (urls, why) in [("amqp://guest:secret@h1/,http://guest:secret@h2/", "must start with"), (" , ", "names no broker")] {
            let err = Config::load(None, env(&[("SAGAFLOW_AMQP_URL", urls)])).unwrap_err().to_string();
            assert!(err.contains(why) && !err.contains("secret"), "{urls}: {err}");
        }
        assert_eq!(redact("amqp://u:a@h1/,amqp://u:b@h2/"), "amqp://u:***@h1/,amqp://u:***@h2/");
        // A primary and its standby.
        let db = "postgres://u:secret@pg1/db,postgres://u:secret@pg2/db";
        assert_eq!(Config::load(None, env(&[("SAGAFLOW_DATABASE_URL", db)])).unwrap().database_url, db);
        let err = Config::load(None, env(&[("SAGAFLOW_DATABASE_URL", "postgres://u:secret@pg1/db,mysql://u:secret@pg2/db")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must start with postgres://") && !err.contains("secret"), "{err}");
        let err =
            Config::load(None, env(&[("SAGAFLOW_DATABASE_URL", "postgres://u:secret@h/db?sslmode=sometimes")])).unwrap_err().to_string();
        assert!(err.contains("database_url") && !err.contains("secret"), "{err}");
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://h/db?user=u&password=pw&sslmode=require"), "postgres://h/db?user=u&password=***&sslmode=require");
        assert_eq!(redact("at `postgres://h/db?PASSWORD=pw`: refused"), "at `postgres://h/db?PASSWORD=***`: refused");
    }

    #[test]
    fn a_file_is_read_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("sagaflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "namespace = \"orders\"\nrelay_batch = 10\n").unwrap();
        let cfg = Config::load(Some(good.to_str().unwrap()), env(&[("SAGAFLOW_RELAY_BATCH", "20")])).unwrap();
        assert_eq!((cfg.namespace.as_str(), cfg.relay_batch), ("orders", 20));
        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "namespce = \"orders\"\n").unwrap();
        let err = Config::load(Some(typo.to_str().unwrap()), []).unwrap_err().to_string();
        assert!(err.contains("namespce"), "{err}");
        let err = Config::load(Some("/nonexistent/sagaflow.toml"), []).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    /// docs/configuration.md lists every key with its variable and default, and its example
    /// file is a valid configuration.
    #[test]
    fn the_configuration_reference_matches_the_code() {
        let doc = include_str!("../../docs/configuration.md");
        let cell = |c: &str| c.trim().trim_matches('`').to_owned();
        let rows: Vec<Vec<String>> = doc
            .lines()
            .skip_while(|l| !l.starts_with("| key | env | default |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split(" | ").map(cell).collect())
            .collect();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let fields: Vec<&String> = defaults.as_object().unwrap().keys().collect();
        let keys: Vec<&String> = rows.iter().map(|r| &r[0]).collect();
        let (mut fields_sorted, mut keys_sorted) = (fields.clone(), keys.clone());
        fields_sorted.sort();
        keys_sorted.sort();
        assert_eq!(keys_sorted, fields_sorted, "every Config field has one row");
        for r in &rows {
            assert_eq!(r[1], format!("SAGAFLOW_{}", r[0].to_uppercase()), "variable of {}", r[0]);
            let default = match &defaults[&r[0]] {
                serde_json::Value::String(s) if s.is_empty() => {
                    if r[0] == "node_id" {
                        "<hostname>-<pid>".to_owned()
                    } else {
                        "empty".to_owned()
                    }
                }
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(r[2], default, "default of {}", r[0]);
        }
        let example = doc.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).expect("an example file");
        let dir = std::env::temp_dir().join(format!("sagaflow-config-doc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sagaflow.toml");
        std::fs::write(&file, example).unwrap();
        let cfg = Config::load(Some(file.to_str().unwrap()), []).unwrap();
        assert_eq!((cfg.namespace.as_str(), cfg.quorum_queues), ("shop", true));
    }
}
