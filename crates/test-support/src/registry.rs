//! A real registry for tests: Debian's `docker-registry` (distribution 2.8) serving a fresh
//! temporary directory on 127.0.0.1, optionally with htpasswd authentication or TLS.
//!
//! One copy for every crate whose tests talk to a registry (the registry client, the registry
//! proxy, the fetch daemon, the snapshotter's daemon tests): what they need from it beyond
//! starting it (repositories, pushes) stays with them, as it uses their own types.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ChildGuard;

/// A docker-registry on 127.0.0.1 storing in its own temporary directory; stopped on drop
/// (the process first, then the directory).
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

/// How [`Registry::start_with`] configures the registry.
#[derive(Clone, Debug, Default)]
pub struct Config<'a> {
    /// `auth: htpasswd` with this one (user, password).
    pub htpasswd: Option<(&'a str, &'a str)>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(&'a Path, &'a Path)>,
}

impl Registry {
    /// Plain HTTP, no authentication.
    pub fn start() -> Registry {
        Registry::start_with(&Config::default())
    }

    /// With `auth: htpasswd` for one user.
    pub fn start_htpasswd(user: &str, password: &str) -> Registry {
        Registry::start_with(&Config {
            htpasswd: Some((user, password)),
            ..Default::default()
        })
    }

    /// Serving HTTPS with this certificate and key (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Registry {
        Registry::start_with(&Config {
            tls: Some((cert, key)),
            ..Default::default()
        })
    }

    /// Starts the registry and waits until it answers; panics (with its log) when it cannot.
    pub fn start_with(config: &Config) -> Registry {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!("docker-registry is not installed: apt-get install -y docker-registry (these tests need it)")
        });
        let dir = tempfile::Builder::new().prefix("registry.").tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let mut auth = String::new();
        if let Some((user, password)) = config.htpasswd {
            // Cost 4, the minimum: the registry checks the hash on every request.
            let hash = bcrypt::hash_with_result(password, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoY);
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                file.display()
            );
        }
        let tls = match config.tls {
            Some((cert, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        // The port is picked by binding :0 and released for the registry; a rare collision is retried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let yml = dir.path().join("config.yml");
            std::fs::write(
                &yml,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                     rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls}{auth}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(&bin)
                .arg("serve")
                .arg(&yml)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let mut child = ChildGuard::new(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(Ok(Some(_))) = child.child_mut().map(|c| c.try_wait()) {
                    break; // exited: most likely the port was taken meanwhile
                }
                // A TLS registry does not answer plain HTTP: a connection is enough there.
                let up = if config.tls.is_some() {
                    TcpStream::connect(&addr).is_ok()
                } else {
                    answers_http(&addr)
                };
                if up {
                    return Registry { addr, child, dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            child.kill9();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        panic!("docker-registry did not start; its log:\n{log}");
    }

    /// The registry's directory (its config, log and `storage/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry keeps a blob's bytes (distribution's filesystem layout), for tests that
    /// corrupt what it serves.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.path().join(format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Stops the registry now (the directory stays until drop).
    pub fn stop(&mut self) {
        self.child.kill9();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Stop the process before `dir` is removed under it.
        self.child.kill9();
    }
}

/// `name` on PATH (or in /usr/bin, /usr/sbin, where Debian puts daemons).
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether something at `addr` answers `GET /v2/` with an HTTP status line (401 counts).
fn answers_http(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("HTTP/1.1 ")
}
