//! The `tessera` binary.

fn main() -> std::process::ExitCode {
    tessera_coordinator::cli::main()
}
