//! `dedupd`: the FUSE fetch daemon. See the `fetch_daemon` library for what it does.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fetch_daemon::{DataPathChoice, Options};
use tracing::{error, info};

/// Serves registry blobs as local files (fanotify pre-content events, or a FUSE mount), fetching verified
/// chunks on demand.
#[derive(Parser, Debug)]
#[command(name = "dedupd", version)]
struct Args {
    /// Cache directory (blobs live in ROOT/blobs).
    #[arg(long)]
    root: PathBuf,
    /// Where to mount the FUSE file system.
    #[arg(long)]
    mountpoint: PathBuf,
    /// The control socket.
    #[arg(long)]
    socket: PathBuf,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, e.g. 127.0.0.1:9580.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Docker config file with registry credentials (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json).
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// Speak plain HTTP to this registry (host or host:port); loopback names always are. Repeatable.
    #[arg(long)]
    plain_http: Vec<String>,
    /// containerd's registry host configuration directory: DIR/<registry>/hosts.toml names mirrors
    /// (tried first, in order), CAs and client certificates, as containerd reads it. A missing
    /// directory means none.
    #[arg(long, default_value = registry::hosts::DEFAULT_HOSTS_DIR)]
    hosts_dir: PathBuf,
    /// Limit for connecting to a registry host; an unreachable mirror is passed over after this
    /// (a hosts.toml `dial_timeout` overrides it for its host).
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Range requests in flight at most.
    #[arg(long, default_value_t = 4)]
    fetch_threads: usize,
    /// A read retries a failing chunk this long before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    read_deadline_secs: u64,
    /// Prefetch bandwidth limit in bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    prefetch_rate: u64,
    /// Chunks not on a blob's prefetch list are fetched in the background only once FUSE reads have
    /// paused for this many milliseconds (a starting container's reads come first).
    #[arg(long, default_value_t = 1000)]
    prefetch_idle_ms: u64,
    /// Fetch only what is read.
    #[arg(long)]
    no_prefetch: bool,
    /// Timeout for connecting and for each read or write of one HTTP request.
    #[arg(long, default_value_t = 10)]
    request_timeout_secs: u64,
    /// How reads of lazy blobs reach dedupd: `fanotify` (the cache file is mounted and the kernel asks only for
    /// missing ranges; Linux 6.14+), `fuse`, or `auto` (fanotify where the kernel has it).
    #[arg(long, default_value = "auto", value_parser = ["auto", "fanotify", "fuse"])]
    data_path: String,
}

fn main() {
    // The fanotify group's holder (started by dedupd itself): nothing else, not even logging.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 4 && argv[1] == fetch_daemon::fanotify::HOLDER_ARG {
        let instance = argv[3].to_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        fetch_daemon::fanotify::holder_main(std::path::Path::new(&argv[2]), instance);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes would garble a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Blocked before any thread starts, so every thread inherits the mask and only sigwait sees them.
    let signals = block_signals();
    let opts = Options {
        root: args.root,
        mountpoint: args.mountpoint,
        socket: args.socket,
        metrics_address: args.metrics_address,
        docker_config: args.docker_config,
        plain_http: args.plain_http,
        hosts_dir: Some(args.hosts_dir),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
        fetch_threads: args.fetch_threads.max(1),
        read_deadline: Duration::from_secs(args.read_deadline_secs),
        prefetch_rate: args.prefetch_rate,
        no_prefetch: args.no_prefetch,
        prefetch_idle: Duration::from_millis(args.prefetch_idle_ms),
        request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
        data_path: match args.data_path.as_str() {
            "fanotify" => DataPathChoice::Fanotify,
            "fuse" => DataPathChoice::Fuse,
            _ => DataPathChoice::Auto,
        },
    };
    let running = match fetch_daemon::start(opts) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start: {e:#}");
            std::process::exit(1);
        }
    };
    // systemd's Type=notify: the control socket and the FUSE mount are up (a no-op
    // outside systemd).
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    let sig = wait_for(&signals);
    info!(signal = sig, "stopping");
    running.stop();
    std::process::exit(0);
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local sigset_t, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is initialized and `sig` is a valid out pointer.
    unsafe {
        libc::sigwait(set, &mut sig);
    }
    sig
}
