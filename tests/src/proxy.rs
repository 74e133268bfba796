//! A fault-injecting TCP proxy to put between a process and RabbitMQ or PostgreSQL: it can cut
//! every open connection, refuse new ones, stall traffic, add latency, and move to a new
//! upstream (a restarted container on a new port).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Faults {
    /// Bumped by `cut`: connections opened before the bump are closed.
    generation: u64,
    refuse: bool,
    stall: bool,
    latency_ms: u64,
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    upstream: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on a free local port and forward to `upstream` (`host:port`).
    pub async fn start(upstream: impl Into<String>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (faults, rx) = watch::channel(Faults::default());
        let upstream = Arc::new(Mutex::new(upstream.into()));
        let up = Arc::clone(&upstream);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let f = *rx.borrow();
                        if f.refuse {
                            drop(client);
                            continue;
                        }
                        let target = up.lock().expect("not poisoned").clone();
                        conns.spawn(pipe(client, target, rx.clone(), f.generation));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, faults, upstream, task })
    }

    /// `host:port` to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Rewrite `url` (an `amqp://` or `postgres://` URL pointing at the upstream) to go through
    /// this proxy.
    pub fn url(&self, url: &str) -> String {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let host_start = url[scheme_end..].find('@').map_or(scheme_end, |i| scheme_end + i + 1);
        let host_end = url[host_start..].find(['/', '?']).map_or(url.len(), |i| host_start + i);
        format!("{}{}{}", &url[..host_start], self.addr, &url[host_end..])
    }

    /// Close every open connection (as a network partition or a broker crash would).
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// Refuse (`true`) or accept new connections.
    pub fn refuse(&self, on: bool) {
        self.faults.send_modify(|f| f.refuse = on);
    }

    /// Stop (`true`) or resume moving bytes, without closing anything.
    pub fn stall(&self, on: bool) {
        self.faults.send_modify(|f| f.stall = on);
    }

    /// Delay every chunk of traffic by `latency`.
    pub fn latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
    }

    /// Send new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: impl Into<String>) {
        *self.upstream.lock().expect("not poisoned") = upstream.into();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, target: String, faults: watch::Receiver<Faults>, generation: u64) {
    let Ok(server) = TcpStream::connect(&target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        () = copy(cr, sw, faults.clone(), generation) => {}
        () = copy(sr, cw, faults.clone(), generation) => {}
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    generation: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            changed = faults.changed() => {
                if changed.is_err() || faults.borrow().generation != generation { return; }
                continue;
            }
        };
        // Hold the chunk while stalled; give up when cut.
        loop {
            let f = *faults.borrow();
            if f.generation != generation {
                return;
            }
            if !f.stall {
                if f.latency_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
                }
                break;
            }
            if faults.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_forwards_cuts_and_refuses() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(echo_addr.to_string()).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "a cut connection is closed");

        proxy.refuse(true);
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await.unwrap().unwrap_or(0);
        assert_eq!(got, 0, "a refused connection is closed at once");
        proxy.refuse(false);

        assert_eq!(proxy.url("amqp://guest:guest@127.0.0.1:5672/%2f"), format!("amqp://guest:guest@{}/%2f", proxy.addr()));
        assert_eq!(proxy.url("postgres://postgres@127.0.0.1:5432/db?x=1"), format!("postgres://postgres@{}/db?x=1", proxy.addr()));
    }
}
