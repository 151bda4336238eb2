//! etcd for the tests that need one: `$FERRITE_ETCD_BIN` or `etcd` on `PATH`; without one the
//! test fails under `CI=true` and skips (saying so) elsewhere.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdProcess {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdProcess {
    pub fn start() -> Option<EtcdProcess> {
        let bin = std::env::var("FERRITE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        if Command::new(&bin).arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").is_err(),
                "etcd not found ({bin}); scripts/install-deps.sh installs it"
            );
            eprintln!("skipping: etcd not found ({bin}); scripts/install-deps.sh installs it");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (client, peer) =
            (format!("http://127.0.0.1:{}", port()), format!("http://127.0.0.1:{}", port()));
        let child = Command::new(&bin)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let process = EtcdProcess { child, endpoint: client.clone(), _dir: dir };
        let addr = client.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(process)
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
