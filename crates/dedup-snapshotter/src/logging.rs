//! Logging for every subcommand: `tracing` to stderr, colour only on a terminal
//! (journald and log files get plain text), JSON lines on request.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sets up logging with `level` (a `tracing` filter), else RUST_LOG, else `default`.
pub fn init(level: Option<&str>, default: &str, json: bool) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
