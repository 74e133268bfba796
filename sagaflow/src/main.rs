//! `sagaflow`: see the [`sagaflow`] library.

fn main() -> std::process::ExitCode {
    sagaflow::main()
}
