//! Starts a real `etcd` on free loopback ports with a temporary data dir; kills it on drop.
//!
//! The binary is `$FERRITE_ETCD_BIN` or `etcd` on `PATH` (`scripts/install-deps.sh`
//! installs it). Without one, `EtcdProcess::start` fails the test when `CI=true` and returns
//! `None` (the caller skips, printing why) elsewhere.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EtcdProcess {
    child: Child,
    pub endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers a request.
    pub async fn start() -> Option<EtcdProcess> {
        let bin = find_binary()?;
        // A free port can be taken by someone else between our probe and etcd's bind: retry.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(&bin).await {
                Ok(p) => return Some(p),
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    async fn try_start(bin: &PathBuf) -> Result<EtcdProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("etcd.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let mut process = EtcdProcess { child, endpoint: client_url, log, _dir: dir };
        process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("etcd exited with {status}; log:\n{}", self.log_tail()));
            }
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(1));
            let endpoints = [self.endpoint.as_str()];
            if let Ok(mut client) = etcd_client::Client::connect(endpoints, Some(options)).await {
                if client.status().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd not ready in {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Binds port 0 on loopback, notes the port, releases it.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FERRITE_ETCD_BIN") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file());
    if on_path.is_some() {
        return on_path;
    }
    let why = "etcd binary not found (install etcd-server, run scripts/install-deps.sh, \
               or set FERRITE_ETCD_BIN)";
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{why}; CI=true, so the etcd store tests must run");
    }
    eprintln!("SKIPPED: {why}");
    None
}
