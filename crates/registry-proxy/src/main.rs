//! `registry-proxy`: a loopback HTTP/1.1 reverse proxy in front of a registry, to simulate a slow or
//! failing network in tests and benchmarks. See the library docs for the `/_proxy/` control API.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use registry_proxy::Proxy;

/// Forwards HTTP/1.1 to a registry, with a rate limit and injectable faults (`/_proxy/config`).
#[derive(Parser, Debug)]
#[command(name = "registry-proxy", version)]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The registry, `host:port`.
    #[arg(long)]
    upstream: String,
    /// Response body bytes per second for all connections together; 0 is unlimited.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Milliseconds of latency before each forwarded response.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Also write the bound address to this file (atomically: written aside, then renamed).
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Log each forwarded request (method, target, body framing, status) to stderr.
    #[arg(long, short)]
    verbose: bool,
}

fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let proxy = match Proxy::bind(&args.listen, &args.upstream) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("registry-proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let shared = proxy.shared();
    shared.settings.set_rate(args.rate);
    shared.settings.set_delay_ms(args.delay_ms);
    shared.verbose.store(args.verbose, std::sync::atomic::Ordering::Relaxed);
    let addr = match proxy.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => {
            eprintln!("registry-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{addr}");
    let _ = std::io::stdout().flush();
    if let Some(file) = &args.port_file {
        if let Err(e) = write_atomically(file, &format!("{addr}\n")) {
            eprintln!("registry-proxy: cannot write {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    }
    match proxy.serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
