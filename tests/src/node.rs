//! Orchestrator nodes and participants as child processes, to kill them for real.

use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::TestEnv;

/// A child process (a `sagaflow serve` node or a participant).
pub struct Node {
    child: Child,
    /// Its node id.
    pub id: String,
    /// The file its stdout and stderr go to.
    pub log: std::path::PathBuf,
}

impl Node {
    /// Start `sagaflow serve` (the binary at `exe`, normally `env!("CARGO_BIN_EXE_sagaflow-node")`)
    /// against `env` as node `id`.
    pub fn spawn(exe: &str, env: &TestEnv, id: &str) -> anyhow::Result<Self> {
        Self::spawn_with(exe, &["serve"], env.node_env(id), id)
    }

    /// Start any of the testkit's binaries with `args` and environment `vars`; its stdout and stderr go to
    /// `$TMPDIR/sagaflow-test-logs/{id}-{test pid}.log`.
    pub fn spawn_with(exe: &str, args: &[&str], vars: Vec<(String, String)>, id: &str) -> anyhow::Result<Self> {
        // Each child logs to its own file, so a suite's output stays readable; the path is
        // printed when a suite fails.
        let dir = std::env::temp_dir().join("sagaflow-test-logs");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{id}-{}.log", std::process::id()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let child = Command::new(exe)
            .args(args)
            .envs(vars)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child, id: id.into(), log: path })
    }

    /// Whether it is still running (it did not exit or crash).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no flush, in-flight work lost mid-transaction.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then wait for a graceful exit; returns whether it exited successfully.
    pub async fn terminate(mut self) -> anyhow::Result<bool> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("node already exited"))?;
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(self.child.wait().await?.success())
    }
}
