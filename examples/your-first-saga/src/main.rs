//! The orchestrator node serving [`your_first_saga::registry`], and its CLI:
//! `your-first-saga serve`, `your-first-saga start --definition signup --input '{"email":"a@b.c"}'`,
//! `your-first-saga list`, ... (configuration: `SAGAFLOW_*` variables or `--config`).

fn main() -> std::process::ExitCode {
    orchestrator::cli::main_with(your_first_saga::registry)
}
