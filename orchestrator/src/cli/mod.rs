//! The node's command line: run a node (`serve`), migrate the database (`migrate`), and the
//! operator commands (`start`, `show`, `list`, ...). A deployment's whole binary is
//! `fn main() -> ExitCode { orchestrator::cli::main_with(my_registry) }`; a binary with commands
//! of its own (the `sagaflow` crate adds `demo`) flattens [`Command`] and [`ConfigArg`] into its
//! own parser and runs them with [`execute`] and [`run`]. Configuration: `--config file.toml`
//! and `SAGAFLOW_*` variables (see [`Config`]).

mod ops_cli;

use std::process::ExitCode;

use crate::{Config, Orchestrator};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sagas::Registry;

pub use ops_cli::{AbortArgs, BulkArgs, IdArgs, ListArgs, SignalArgs, StartArgs, VersionsArgs, WaitArgs};

#[derive(Parser)]
#[command(name = "sagaflow", version, about = "Saga orchestrator over RabbitMQ and PostgreSQL")]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: Command,
}

/// The `--config` option of every command; a binary with commands of its own flattens it into
/// its parser.
#[derive(clap::Args)]
pub struct ConfigArg {
    /// TOML configuration file; `SAGAFLOW_*` environment variables override it.
    #[arg(long, global = true, env = "SAGAFLOW_CONFIG")]
    config: Option<String>,
}

impl ConfigArg {
    /// The configuration: the file, then the `SAGAFLOW_*` variables.
    pub fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config.as_deref(), std::env::vars())?)
    }
}

/// The node's commands.
#[derive(Subcommand)]
pub enum Command {
    /// Run an orchestrator node until SIGTERM or Ctrl-C.
    Serve,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Start a saga.
    Start(ops_cli::StartArgs),
    /// Show one saga: status, steps, compensations.
    Show(ops_cli::IdArgs),
    /// List sagas, newest first.
    List(ops_cli::ListArgs),
    /// Wait until a saga is completed, compensated or stopped (exit code 2 on timeout).
    Wait(ops_cli::WaitArgs),
    /// Deliver an external event to a waiting saga.
    Signal(ops_cli::SignalArgs),
    /// Abort a running saga: it compensates.
    Abort(ops_cli::AbortArgs),
    /// Retry a failed compensation.
    Retry(ops_cli::IdArgs),
    /// Skip a failed compensation that was handled by hand.
    Skip(ops_cli::IdArgs),
    /// Resume a stopped saga.
    Resume(ops_cli::IdArgs),
    /// Abort, retry, skip or resume every saga matching a filter: previews how many, and acts
    /// with `--yes <that count>`.
    Bulk(ops_cli::BulkArgs),
    /// Every definition version this binary serves or the database has sagas of, with how many
    /// are still open: which versions a release may drop.
    Versions(ops_cli::VersionsArgs),
    /// Sagas started by the clock: `schedule set NAME --cron ...`, `list`, `show`, `delete`,
    /// `pause`, `resume`.
    #[command(subcommand)]
    Schedule(ops_cli::ScheduleCommand),
}

impl Command {
    /// Whether this command runs a node (its logs say what it decides).
    pub fn serves(&self) -> bool {
        matches!(self, Self::Serve)
    }
}

/// Parse the arguments, run the command, and map the result to an exit code, with `serve`
/// serving the definitions `registry` returns: the whole binary of a deployment with its own
/// sagas is `fn main() -> ExitCode { orchestrator::cli::main_with(my_registry) }`.
pub fn main_with(registry: fn() -> anyhow::Result<Registry>) -> ExitCode {
    let cli = Cli::parse();
    execute(cli.command.serves(), async move { run(cli.config.load()?, cli.command, registry).await })
}

/// Set up logging (a node's lines when `serving`, else warnings only) and the span export (when
/// configured), run `command` on a
/// runtime, and map its result to an exit code (an error is printed with its causes).
pub fn execute(serving: bool, command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    // A node logs what it decides; other commands print their results. lapin's own lines are
    // off by default: a lost connection is told once, with its cause, by the node.
    let default_filter =
        if serving { "warn,orchestrator=info,participants_sdk=info,sagaflow_amqp=info,sagaflow=info,lapin=off" } else { "warn,lapin=off" };
    // Spans also leave the process when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_*);
    // the guard sends the last ones when the command ends.
    let _telemetry = match sagaflow_amqp::telemetry::init(default_filter, "sagaflow") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sagaflow: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sagaflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagaflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run `command` with `config`, a node serving the definitions `registry` returns.
pub async fn run(config: Config, command: Command, registry: fn() -> anyhow::Result<Registry>) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let node = Orchestrator::connect(config, registry()?).await?;
            tracing::info!("serving");
            let stopped = node.run(async {
                participants_sdk::shutdown_signal().await;
                tracing::info!("shutting down");
            });
            Ok(stopped.await?)
        }
        Command::Migrate => {
            let pool = crate::runtime::connect_pool(&config.database_url, "sagaflow cli", 2, config.connect_timeout()).await?;
            crate::store::migrate(&pool).await.context("running the migrations")?;
            println!("migrate: the database schema is up to date");
            Ok(())
        }
        other => ops_cli::run(config, registry()?, other).await,
    }
}
