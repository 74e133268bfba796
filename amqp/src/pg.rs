//! PostgreSQL with a standby: a database URL may name several servers, separated by commas (a
//! primary and its standbys). A pool made by [`pool_following`] connects to the one that accepts
//! writes, refuses connections to one that does not (a standby, or a demoted primary), and
//! follows a failover: a task checks every [`CHECK_EVERY`] that its server still accepts writes,
//! and when it does not (or cannot be reached) finds the one that does and points the pool's new
//! connections at it. Connections to the old server fail with their statements, which every
//! caller handles (the input is redelivered, the step's record is made again).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgPool};

/// How often a pool on several servers checks that its server still accepts writes.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The database a process uses when it is given none: the local server's `postgres` database.
pub const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long one server may take to answer whether it accepts writes.
const ASK_WITHIN: Duration = Duration::from_secs(3);

/// `url` with its database replaced by `database`, its query (`?sslmode=…`) kept: for tools and
/// tests that create a database of their own on a server they were given.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database of its own for a test, on the server of `SAGAFLOW_TEST_DATABASE_URL` (else
/// [`LOCAL_DATABASE_URL`]'s), as a role that may create
/// databases. Dropped by [`ScratchDatabase::drop`], which ends the sessions still on it.
pub struct ScratchDatabase {
    server: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    /// Create one named `{prefix}_{a unique suffix}`; `prefix` is a plain identifier (ASCII
    /// letters, digits and `_`, not starting with a digit) of at most 24 bytes.
    pub async fn create(prefix: &str) -> Result<Self, sqlx::Error> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let server = std::env::var("SAGAFLOW_TEST_DATABASE_URL").unwrap_or_else(|_| LOCAL_DATABASE_URL.into());
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}_{}_{nanos}_{n}", std::process::id());
        on_server(&server, format!("CREATE DATABASE {}", identifier(&name)?)).await?;
        let url = with_database(&server, &name);
        Ok(Self { server, name, url })
    }

    /// The URL that names it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drop it.
    pub async fn drop(self) -> Result<(), sqlx::Error> {
        on_server(&self.server, format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await
    }
}

/// `name` if PostgreSQL takes it as it is: unquoted, and within its 63 bytes (a longer one would
/// be cut short, and the URL made from it name no database).
fn identifier(name: &str) -> Result<&str, sqlx::Error> {
    let plain =
        name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && name.starts_with(|c: char| !c.is_ascii_digit());
    if plain { Ok(name) } else { Err(sqlx::Error::Configuration(format!("{name:?} is not a plain database name").into())) }
}

/// Run `sql` on a connection of its own to the server of `url`.
async fn on_server(url: &str, sql: String) -> Result<(), sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
    let _ = conn.close().await;
    done.map(drop)
}

/// The servers of `urls`: one URL, or several separated by commas.
pub fn database_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Whether the server `conn` is on accepts writes (it is not in recovery).
async fn writable(conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(conn).await?;
    Ok(!in_recovery)
}

/// The first of `servers` that accepts writes, and a connection to it; with one server, a
/// connection to it whatever it is. The error of the last server tried when none does.
pub async fn find_primary(servers: &[PgConnectOptions]) -> Result<(usize, sqlx::PgConnection), sqlx::Error> {
    let mut last = sqlx::Error::Configuration("no database URL given".into());
    for (i, options) in servers.iter().enumerate() {
        let attempt = async {
            let mut conn = sqlx::PgConnection::connect_with(options).await?;
            if servers.len() == 1 || writable(&mut conn).await? {
                Ok(Some(conn))
            } else {
                let _ = conn.close().await;
                Ok(None)
            }
        };
        match tokio::time::timeout(ASK_WITHIN, attempt).await {
            Ok(Ok(Some(conn))) => return Ok((i, conn)),
            Ok(Ok(None)) => {
                last = sqlx::Error::Configuration(
                    format!("{}:{} does not accept writes (a standby)", options.get_host(), options.get_port()).into(),
                );
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from PostgreSQL")),
        }
    }
    Err(last)
}

/// A pool on `servers[primary]` with `options`. With several servers its new connections must
/// accept writes, and a task (ending when the pool closes) follows the primary.
pub async fn pool_following(options: PgPoolOptions, servers: Vec<PgConnectOptions>, primary: usize) -> Result<PgPool, sqlx::Error> {
    let first = servers[primary].clone();
    if servers.len() == 1 {
        return options.connect_with(first).await;
    }
    let options = options.after_connect(|conn, _| {
        Box::pin(async move {
            if writable(conn).await? {
                Ok(())
            } else {
                Err(sqlx::Error::Configuration("the server does not accept writes (a standby): waiting for the primary".into()))
            }
        })
    });
    let pool = options.connect_with(first).await?;
    tokio::spawn(follow(pool.clone(), servers, primary));
    Ok(pool)
}

/// Keep `pool`'s new connections on the server of `servers` that accepts writes, until it closes.
async fn follow(pool: PgPool, servers: Vec<PgConnectOptions>, mut current: usize) {
    // An outage is told once, then every `OUTAGE_REMINDER` while it lasts.
    let mut told: Option<std::time::Instant> = None;
    while !pool.is_closed() {
        tokio::time::sleep(CHECK_EVERY).await;
        let ok = async {
            let mut conn = sqlx::PgConnection::connect_with(&servers[current]).await?;
            let w = writable(&mut conn).await;
            let _ = conn.close().await;
            w
        };
        if matches!(tokio::time::timeout(ASK_WITHIN, ok).await, Ok(Ok(true))) {
            told = None;
            continue;
        }
        match find_primary(&servers).await {
            Ok((i, conn)) => {
                let _ = conn.close().await;
                if i != current {
                    let (from, to) = (&servers[current], &servers[i]);
                    tracing::warn!(
                        from = %format!("{}:{}", from.get_host(), from.get_port()),
                        to = %format!("{}:{}", to.get_host(), to.get_port()),
                        "PostgreSQL failed over: new connections go to the server that accepts writes"
                    );
                    pool.set_connect_options(servers[i].clone());
                    current = i;
                }
                told = None;
            }
            Err(e) if told.is_none_or(|t| t.elapsed() >= crate::transport::OUTAGE_REMINDER) => {
                told = Some(std::time::Instant::now());
                tracing::warn!(error = %e, "no PostgreSQL server accepts writes; looking again every second");
            }
            Err(e) => tracing::debug!(error = %e, "no PostgreSQL server accepts writes yet"),
        }
    }
}

/// Each server of `urls` parsed, with `tweak` applied; an error naming the one that does not parse.
pub fn parse_servers(urls: &str, tweak: impl Fn(PgConnectOptions) -> PgConnectOptions) -> Result<Vec<PgConnectOptions>, String> {
    let servers: Vec<PgConnectOptions> = database_urls(urls)
        .into_iter()
        .map(|u| u.parse::<PgConnectOptions>().map(&tweak).map_err(|e| format!("{}: {e}", crate::transport::redact(u))))
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("names no server".into());
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::{identifier, with_database};

    #[test]
    fn only_a_plain_name_makes_a_database() {
        assert!(identifier("sagaflow_store_01").is_ok());
        assert!(identifier(&"a".repeat(63)).is_ok());
        for bad in ["", "1st", "a-b", "a;DROP DATABASE x", "a b", "\u{e9}", &"a".repeat(64)] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_database_name_is_replaced_and_the_query_kept() {
        assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/postgres?sslmode=require", "x"), "postgres://u@h/x?sslmode=require");
        assert_eq!(with_database("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
    }
}
