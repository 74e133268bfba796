//! `sagaflow` serving the benchmark saga (`bench-node serve`).

fn main() -> std::process::ExitCode {
    orchestrator::cli::main_with(bench::saga::registry)
}
