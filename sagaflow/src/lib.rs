//! The `sagaflow` command line: the node's commands ([`orchestrator::cli::Command`]: `serve`,
//! `migrate`, `start`, `show`, `list`, ...) serving the bundled order-fulfilment example, and
//! `demo`, which runs that example end to end in one process. A deployment with its own sagas
//! does not need this crate: its binary is `orchestrator::cli::main_with(my_registry)`.

mod demo;
mod local;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sagas::Registry;

#[derive(Parser)]
#[command(name = "sagaflow", version, about = "Saga orchestrator over RabbitMQ and PostgreSQL")]
struct Cli {
    #[command(flatten)]
    config: orchestrator::cli::ConfigArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the order-fulfilment example in-process (orchestrator + inventory, payment and
    /// shipping) and print the outcome counts. RabbitMQ or PostgreSQL on this machine that
    /// nothing answers for is started in Docker for the run.
    Demo(demo::Args),
    #[command(flatten)]
    Node(orchestrator::cli::Command),
}

/// Parse the arguments, run the command, and map the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(&cli.command, Command::Node(c) if c.serves());
    orchestrator::cli::execute(serving, async move {
        let config = cli.config.load()?;
        match cli.command {
            Command::Demo(args) => {
                let mut local = local::LocalServices::start_missing(&config).await?;
                let result = tokio::select! {
                    result = demo::run(config, args) => result,
                    () = participants_sdk::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
                };
                local.remove().await;
                result
            }
            Command::Node(command) => orchestrator::cli::run(config, command, registry).await,
        }
    })
}

/// The definitions the `sagaflow` binary serves: the bundled example.
pub fn registry() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    r.register(order_fulfilment::definition()?.erased())?;
    Ok(r)
}
