//! The `sagaflow` command line, built inside the testkit package so suites can run nodes as
//! child processes (`CARGO_BIN_EXE_sagaflow-node`) and kill them.

fn main() -> std::process::ExitCode {
    sagaflow::main()
}
