//! Security with real processes: a coordinator with TLS and tokens made by `ferrite certs
//! init` and `ferrite token create`, and the operator CLI and workers against it. Each
//! refusal must name what is missing, and nothing refused may be stored.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrite_security::{certs, Claims, Role, Signer};
use harness::{Proc, FERRITE};

/// A TLS coordinator with tokens, its certificates, and a job file's worth of data.
struct Secure {
    dir: tempfile::TempDir,
    coordinator: Proc,
}

impl Secure {
    fn start(extra: &[&str]) -> Secure {
        let dir = tempfile::tempdir().unwrap();
        let out = run(ferrite().args(["certs", "init"]).arg(dir.path().join("certs")));
        assert!(out.status.success(), "certs init: {}", stderr(&out));
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("runs")).unwrap();
        let c = |f: &str| dir.path().join("certs").join(f);
        let mut cmd = ferrite();
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("embedded:{}", dir.path().join("c.redb").display()))
            .arg("--tls-cert")
            .arg(c(certs::SERVER_CERT))
            .arg("--tls-key")
            .arg(c(certs::SERVER_KEY))
            .arg("--token-key")
            .arg(c(certs::TOKEN_PUB))
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--checkpoint-root")
            .arg(dir.path().join("runs"))
            .args(extra);
        let coordinator = Proc::start(cmd, &dir.path().join("coordinator.log"));
        Secure { dir, coordinator }
    }

    fn cert(&self, file: &str) -> PathBuf {
        self.dir.path().join("certs").join(file)
    }

    fn url(&self) -> String {
        format!("https://{}", self.coordinator.addr)
    }

    /// A token made with `ferrite token create`.
    fn token(&self, role: &str) -> String {
        let out = run(ferrite()
            .args(["token", "create", "--subject", &format!("test-{role}"), "--role", role])
            .arg("--key")
            .arg(self.cert(certs::TOKEN_KEY)));
        assert!(out.status.success(), "token create: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// `ferrite <args>` against the coordinator over TLS, with `token` if any.
    fn cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = ferrite();
        cmd.args(args)
            .args(["--coordinator", &self.url()])
            .arg("--tls-ca")
            .arg(self.cert(certs::CA_CERT));
        if let Some(t) = token {
            cmd.env("FERRITE_TOKEN", t);
        }
        run(&mut cmd)
    }

    /// A job file with these paths, in the temp dir.
    fn job(&self, data: &Path, out: &Path) -> PathBuf {
        let text = format!(
            "[model]\nn_layer = 1\nn_head = 1\nn_embd = 8\nblock_size = 8\n[data]\ndir = {data:?}\n\
             [train]\nbatch_size = 2\nmax_steps = 2\n[output]\ndir = {out:?}\n[cluster]\nworkers = 1\n"
        );
        static FILES: AtomicUsize = AtomicUsize::new(0);
        let n = FILES.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("job-file-{n}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }
}

/// `ferrite` with none of the caller's FERRITE_* settings.
fn ferrite() -> Command {
    let mut cmd = Command::new(FERRITE);
    for var in ["FERRITE_COORDINATOR", "FERRITE_TOKEN", "FERRITE_TOKEN_FILE", "FERRITE_TLS_CA"] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run ferrite")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Fails with a one-line error that contains `want`.
fn refused(out: &Output, want: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "succeeded where `{want}` was expected");
    assert!(err.contains(want), "expected `{want}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_server_without_tls_or_tokens_needs_insecure_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}", dir.path().join("c.redb").display());
    let out = run(ferrite().args(["coordinator", "--listen", "127.0.0.1:0", "--store", &store]));
    refused(&out, "no TLS certificate");
    refused(&out, "--insecure");

    let out = run(ferrite().args(["serve", "--checkpoint", "/nonexistent"]));
    refused(&out, "no TLS certificate");

    let mut cmd = ferrite();
    cmd.args(["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--store", &store]);
    let log = dir.path().join("c.log");
    let c = Proc::start(cmd, &log);
    c.kill();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("INSECURE coordinator: PLAIN TEXT (no TLS), NO TOKENS"), "{said}");
}

#[test]
fn tokens_grant_exactly_their_roles_and_each_refusal_says_why() {
    let s = Secure::start(&[]);
    let (read, submit, worker) = (s.token("read"), s.token("submit"), s.token("worker"));
    let job = s.job(&s.dir.path().join("data"), &s.dir.path().join("runs/a"));
    let job = job.to_str().unwrap();

    // No token at all.
    refused(
        &s.cli(None, &["job", "list"]),
        "no token: this call needs a token with role admin or submit or read",
    );
    // A read token reads, and cannot submit or cancel.
    let out = s.cli(Some(&read), &["job", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    refused(
        &s.cli(Some(&read), &["job", "submit", job]),
        "has role read; this call needs role admin or submit",
    );
    refused(&s.cli(Some(&read), &["job", "cancel", "job-1"]), "needs role admin or submit");
    // A worker join token is good for nothing an operator does.
    refused(&s.cli(Some(&worker), &["job", "list"]), "has role worker");
    refused(&s.cli(Some(&worker), &["job", "submit", job]), "has role worker");

    // Expired, tampered, and signed by another cluster's key.
    let signer = Signer::from_pem_file(&s.cert(certs::TOKEN_KEY)).unwrap();
    let now = now_s();
    let old = Claims { sub: "old".into(), role: Role::Admin, iat: now - 7200, exp: now - 3600 };
    refused(&s.cli(Some(&signer.issue_claims(&old).unwrap()), &["job", "list"]), "token expired");
    let admin = signer.issue("mallory", Role::Admin, Duration::from_secs(60)).unwrap();
    let (r, a): (Vec<&str>, Vec<&str>) = (read.split('.').collect(), admin.split('.').collect());
    let forged = format!("{}.{}.{}", r[0], a[1], r[2]);
    refused(&s.cli(Some(&forged), &["job", "list"]), "signature does not verify");
    let other = tempfile::tempdir().unwrap();
    certs::init(other.path(), &[], 1).unwrap();
    let foreign = Signer::from_pem_file(&other.path().join(certs::TOKEN_KEY)).unwrap();
    let foreign = foreign.issue("eve", Role::Admin, Duration::from_secs(60)).unwrap();
    refused(&s.cli(Some(&foreign), &["job", "list"]), "signature does not verify");

    // The submit token submits; nothing refused above was stored.
    let out = s.cli(Some(&submit), &["job", "submit", job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = String::from_utf8(s.cli(Some(&read), &["job", "list"]).stdout).unwrap();
    assert_eq!(listed.matches("job-").count(), 1, "{listed}");

    // Denials are logged with the caller and subject; tokens never are.
    let log = s.log();
    assert!(log.contains("denied") && log.contains("caller=127.0.0.1:"), "{log}");
    assert!(log.contains("test-read"), "{log}");
    for token in [&read, &submit, &worker, &admin, &forged] {
        assert!(!log.contains(token.as_str()), "a token was logged");
    }
}

#[test]
fn workers_need_a_worker_token_and_operators_cannot_join() {
    let s = Secure::start(&[]);
    let worker = |token: &str| {
        let mut cmd = ferrite();
        cmd.args([
            "worker",
            "--coordinator",
            &s.url(),
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-ca")
        .arg(s.cert(certs::CA_CERT))
        .env("FERRITE_TOKEN", token);
        cmd
    };
    let out = run(&mut worker(&s.token("admin")));
    refused(&out, "has role admin; this call needs role worker");
    let joined = Proc::start(worker(&s.token("worker")), &s.dir.path().join("worker.log"));
    assert!(joined.ready_line.contains(" worker=w-"), "{}", joined.ready_line);
}

#[test]
fn plain_text_against_tls_and_untrusted_certificates_fail_clearly() {
    let s = Secure::start(&[]);
    let read = s.token("read");
    let plain = run(ferrite()
        .args(["job", "list", "--coordinator", &format!("http://{}", s.coordinator.addr)])
        .env("FERRITE_TOKEN", &read));
    refused(&plain, "the server requires TLS: use an https:// URL and --tls-ca");

    let no_ca = run(ferrite().args(["job", "list", "--coordinator", &s.url()]));
    refused(&no_ca, "--tls-ca");

    let other = tempfile::tempdir().unwrap();
    certs::init(other.path(), &[], 1).unwrap();
    let wrong_ca = run(ferrite()
        .args(["job", "list", "--coordinator", &s.url()])
        .arg("--tls-ca")
        .arg(other.path().join(certs::CA_CERT))
        .env("FERRITE_TOKEN", &read));
    refused(&wrong_ca, "cannot reach the coordinator");
}

#[test]
fn job_paths_stay_under_the_roots_and_oversized_specs_are_refused() {
    let s = Secure::start(&[]);
    let submit = s.token("submit");
    let root = s.dir.path();
    let cases = [
        (s.job(&root.join("data/../../etc"), &root.join("runs/a")), "`..` is not allowed"),
        (
            s.job(Path::new("/etc"), &root.join("runs/a")),
            "`data.dir`: `/etc` is outside the allowed roots",
        ),
        (s.job(&root.join("data"), Path::new("/tmp/elsewhere")), "`output.dir`"),
    ];
    for (job, want) in cases {
        refused(&s.cli(Some(&submit), &["job", "submit", job.to_str().unwrap()]), want);
    }
    // A symbolic link inside the data root that points out of it is outside too.
    std::os::unix::fs::symlink("/etc", root.join("data/escape")).unwrap();
    let job = s.job(&root.join("data/escape"), &root.join("runs/a"));
    refused(
        &s.cli(Some(&submit), &["job", "submit", job.to_str().unwrap()]),
        "outside the allowed roots",
    );

    // A job file over the spec limit, and a message over the server's message limit.
    let big = root.join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    refused(&s.cli(Some(&submit), &["job", "submit", big.to_str().unwrap()]), "spec.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(5 << 20))).unwrap();
    refused(
        &s.cli(Some(&submit), &["job", "submit", big.to_str().unwrap()]),
        "message length too large",
    );

    let listed = String::from_utf8(s.cli(Some(&submit), &["job", "list"]).stdout).unwrap();
    assert_eq!(listed.matches("job-").count(), 0, "{listed}");
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate() {
    // A second coordinator, on the first one's certificates, that also wants client ones.
    let s = Secure::start(&[]);
    let ca = s.cert(certs::CA_CERT);
    let mut cmd = ferrite();
    cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("embedded:{}", s.dir.path().join("m.redb").display()))
        .arg("--tls-cert")
        .arg(s.cert(certs::SERVER_CERT))
        .arg("--tls-key")
        .arg(s.cert(certs::SERVER_KEY))
        .arg("--tls-client-ca")
        .arg(&ca)
        .arg("--token-key")
        .arg(s.cert(certs::TOKEN_PUB));
    let m = Proc::start(cmd, &s.dir.path().join("mtls.log"));
    let url = format!("https://{}", m.addr);
    let read = s.token("read");
    let without = run(ferrite()
        .args(["job", "list", "--coordinator", &url])
        .arg("--tls-ca")
        .arg(&ca)
        .env("FERRITE_TOKEN", &read));
    refused(&without, "cannot reach the coordinator");
    refused(&without, "--client-cert");
    let with = run(ferrite()
        .args(["job", "list", "--coordinator", &url])
        .arg("--tls-ca")
        .arg(&ca)
        .arg("--client-cert")
        .arg(s.cert(certs::CLIENT_CERT))
        .arg("--client-key")
        .arg(s.cert(certs::CLIENT_KEY))
        .env("FERRITE_TOKEN", &read));
    assert!(with.status.success(), "{}", stderr(&with));
}

#[test]
fn http_endpoints_need_tls_and_a_token() {
    let s = Secure::start(&["--http-listen", "127.0.0.1:0"]);
    let http = s.coordinator.field("http");
    let read = s.token("read");
    let curl = |path: &str, token: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(s.cert(certs::CA_CERT))
            .arg(format!("https://localhost:{}{path}", http.rsplit(':').next().unwrap()));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd.output().expect("curl (scripts/install-deps.sh installs it)");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(curl("/metrics", None), "401");
    assert_eq!(curl("/metrics", Some(&s.token("worker"))), "403");
    assert_eq!(curl("/metrics", Some(&read)), "200");
    assert_eq!(curl("/api/jobs", Some(&read)), "200");
    assert_eq!(curl("/ui", None), "200", "the page holds no data");
    // Plain HTTP to the TLS port gets no answer.
    let plain = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://{http}/metrics"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}
