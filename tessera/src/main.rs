//! The `tessera` binary: everything is in the crate's library (`tessera::cli`).

fn main() -> std::process::ExitCode {
    tessera::cli::main()
}
