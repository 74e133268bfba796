//! The `sagaflow` command line serving the bundled example and the probe's definitions with
//! shared-resource limits (`testkit::probe::limited_definitions`), so suites can run such nodes
//! as child processes and kill them.

fn main() -> std::process::ExitCode {
    orchestrator::cli::main_with(testkit::probe::node_registry)
}
