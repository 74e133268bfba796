//! The `sagaflow` command line: run a node (`serve`), migrate the database (`migrate`), or
//! run the order-fulfilment demo (`demo`). It serves the bundled example definitions.
//! Configuration: `--config file.toml` and `SAGAFLOW_*` variables (see [`Config`]).

mod demo;
mod local;
mod ops_cli;

use std::process::ExitCode;

use crate::{Config, Orchestrator};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sagas::Registry;

#[derive(Parser)]
#[command(name = "sagaflow", version, about = "Saga orchestrator over RabbitMQ and PostgreSQL")]
struct Cli {
    /// TOML configuration file; `SAGAFLOW_*` environment variables override it.
    #[arg(long, global = true, env = "SAGAFLOW_CONFIG")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run an orchestrator node until SIGTERM or Ctrl-C.
    Serve,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Run the order-fulfilment example in-process (orchestrator + inventory, payment and
    /// shipping) and print the outcome counts.
    Demo(demo::Args),
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
    /// Every definition version this binary serves or the database has sagas of, with how many
    /// are still open: which versions a release may drop.
    Versions(ops_cli::VersionsArgs),
}

/// Parse the arguments, run the command, and map the result to an exit code; `serve` serves
/// the bundled example definitions.
pub fn main() -> ExitCode {
    main_with(registry)
}

/// Like [`main`], with `serve` serving the definitions `registry` returns: the whole binary
/// of a deployment with its own sagas is `fn main() -> ExitCode { orchestrator::cli::main_with(my_registry) }`.
pub fn main_with(registry: fn() -> anyhow::Result<Registry>) -> ExitCode {
    let cli = Cli::parse();
    // The demo prints one line per run; a node logs what it decides. lapin's own lines are off
    // by default: a lost connection is told once, with its cause, by the node.
    let default_filter = if matches!(cli.command, Command::Serve) {
        "warn,orchestrator=info,participants_sdk=info,sagaflow_amqp=info,sagaflow=info,lapin=off"
    } else {
        "warn,lapin=off"
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sagaflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, registry)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagaflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, registry: fn() -> anyhow::Result<Registry>) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref(), std::env::vars())?;
    match cli.command {
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
        Command::Demo(args) => {
            let mut local = local::LocalServices::start_missing(&config).await?;
            let result = tokio::select! {
                result = demo::run(config, args) => result,
                () = participants_sdk::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
            };
            local.remove().await;
            result
        }
        other => ops_cli::run(config, registry()?, other).await,
    }
}

/// The definitions the `sagaflow` binary serves: the bundled examples.
pub fn registry() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    r.register(order_fulfilment::definition()?.erased())?;
    Ok(r)
}
