//! `sagaflow`: see [`orchestrator::cli`].

fn main() -> std::process::ExitCode {
    orchestrator::cli::main()
}
