//! `ferrite quickstart` as a user runs it: the whole system as local processes, then a
//! generation; and Ctrl-C stopping every process it started.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FERRITE: &str = env!("CARGO_BIN_EXE_ferrite");

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text: String = (0..300)
        .map(|i| format!("The quick fox {} jumps over the lazy dog {}.\n", i % 7, i % 3))
        .collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn quickstart(dir: &Path, steps: u64) -> Command {
    let mut cmd = Command::new(FERRITE);
    cmd.args(["quickstart", "--dir"])
        .arg(dir.join("qs"))
        .arg("--corpus")
        .arg(corpus(dir))
        .args(["--steps", &steps.to_string(), "--max-tokens", "40"])
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Every server the quickstart started logged its clean stop.
fn assert_all_stopped(dir: &Path) {
    let logs = dir.join("qs/logs");
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    assert!(read("coordinator.log").contains("coordinator stopped"), "{}", read("coordinator.log"));
    for w in ["worker-0.log", "worker-1.log"] {
        assert!(read(w).contains("worker stopped"), "{w}: {}", read(w));
    }
}

#[test]
fn quickstart_trains_on_two_workers_serves_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let out = quickstart(dir.path(), 30).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("job-"), "{stdout}");
    // The generation starts with the prompt and goes on in the corpus' alphabet.
    let generated = stdout.lines().find(|l| l.starts_with("The ")).expect("a generation");
    assert!(generated.len() > "The ".len() + 10, "{generated:?}");
    assert!(stderr.contains("==> done"), "{stderr}");
    let ckpts = std::fs::read_dir(dir.path().join("qs/out/checkpoints")).unwrap().count();
    assert!(ckpts > 0);
    assert_all_stopped(dir.path());
}

#[test]
fn ctrl_c_stops_every_process_of_the_quickstart() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = quickstart(dir.path(), 1_000_000).stdout(Stdio::null()).spawn().unwrap();
    // Wait until training runs (a worker got its rank), then interrupt.
    let log = dir.path().join("qs/logs/worker-0.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("assignment") {
        assert!(Instant::now() < deadline, "training never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the quickstart did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert_all_stopped(dir.path());
}
