//! `ferrite serve` as an operator runs it: the READY line, `ferrite generate --server` giving
//! what the local command gives, the OpenAI-compatible endpoint and `/metrics`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

mod common;
use common::{ferrite, ok};

const JOB: &str = r#"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
[data]
dir = "data"
[train]
batch_size = 4
max_steps = 10
learning_rate = 3e-3
warmup_steps = 2
lr_decay_steps = 10
eval_interval = 10
eval_steps = 1
threads = 2
[output]
dir = "out"
checkpoint_interval = 10
"#;

/// A small char model trained for a few steps; returns its checkpoint folder.
fn trained(dir: &Path) -> String {
    let text: String = (0..200).map(|i| format!("line {} of a small corpus.\n", i % 7)).collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    ok(&ferrite(&["data", "prepare", "--tokenizer", "char", "--out", "data", "corpus.txt"], dir));
    std::fs::write(dir.join("job.toml"), JOB).unwrap();
    ok(&ferrite(&["train", "job.toml", "--plain"], dir));
    dir.join("out/checkpoints/step-00000010").to_str().unwrap().to_string()
}

struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Server {
    fn start(checkpoint: &str) -> Server {
        Server::start_with(checkpoint, &[])
    }

    fn start_with(checkpoint: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(["serve", "--insecure", "--checkpoint", checkpoint, "--listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0", "--threads", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferrite serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("READY line");
        let rest = line.trim_end().strip_prefix("READY addr=").unwrap_or_else(|| {
            let _ = child.kill();
            panic!("expected READY addr=..., got {line:?}")
        });
        let (grpc, http) = rest.split_once(" http=").expect("an http= address");
        Server { grpc: grpc.to_string(), http: http.to_string(), child }
    }

    /// One HTTP/1.1 request; returns (status line, body).
    fn http(&self, method: &str, path: &str, body: &str) -> (String, String) {
        let mut s = TcpStream::connect(&self.http).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_string();
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn served_generation_equals_local_generation_over_grpc_and_http() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = trained(dir);
    let server = Server::start(&ck);
    let url = format!("http://{}", server.grpc);
    let flags = ["--prompt", "line", "--max-tokens", "20", "--temperature", "0.9", "--seed", "5"];

    // The same flags, here and on the server: the same text, tokens and log-probabilities.
    let local = ok(&ferrite(&[&["generate", "--checkpoint", &ck][..], &flags].concat(), dir));
    let remote = ok(&ferrite(&[&["generate", "--server", &url][..], &flags].concat(), dir));
    assert_eq!(local, remote);
    assert!(local.starts_with("line") && local.len() > 5, "{local}");
    let with_stop = [&flags[..], &["--stop", "a", "--json"]].concat();
    let local =
        json(&ok(&ferrite(&[&["generate", "--checkpoint", &ck][..], &with_stop].concat(), dir)));
    let remote =
        json(&ok(&ferrite(&[&["generate", "--server", &url][..], &with_stop].concat(), dir)));
    for key in ["prompt_tokens", "tokens", "logprobs", "text"] {
        assert_eq!(local[key], remote[key], "{key}");
    }
    assert_eq!(remote["checkpoint"]["step"], 0);

    // A bad parameter is a one-line error naming it.
    let bad = ferrite(&["generate", "--server", &url, "--prompt", "x", "--top-p", "1.5"], dir);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("top_p"));

    // OpenAI's completions API: greedy text equals the local command's.
    let body = r#"{"model":"m","prompt":"line","max_tokens":12,"temperature":0}"#;
    let (status, resp) = server.http("POST", "/v1/completions", body);
    assert!(status.contains("200"), "{status} {resp}");
    let resp = json(&resp);
    let greedy = ["--prompt", "line", "--max-tokens", "12", "--temperature", "0", "--json"];
    let local =
        json(&ok(&ferrite(&[&["generate", "--checkpoint", &ck][..], &greedy].concat(), dir)));
    assert_eq!(resp["choices"][0]["text"], local["text"]);
    assert_eq!(resp["usage"]["completion_tokens"], 12);
    // Streaming: server-sent events whose pieces add up to the same text.
    let body = r#"{"prompt":"line","max_tokens":12,"temperature":0,"stream":true}"#;
    let (status, events) = server.http("POST", "/v1/completions", body);
    assert!(status.contains("200"), "{status}");
    let mut text = String::new();
    for data in events.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data != "[DONE]" {
            text.push_str(json(data)["choices"][0]["text"].as_str().unwrap());
        }
    }
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    assert_eq!(text, local["text"].as_str().unwrap());
    let (status, err) = server.http("POST", "/v1/completions", r#"{"prompt":"a","top_p":0}"#);
    assert!(status.contains("400") && err.contains("top_p"), "{status} {err}");

    let (status, metrics) = server.http("GET", "/metrics", "");
    assert!(status.contains("200"));
    assert!(metrics.contains("ferrite_time_to_first_token_seconds_count"), "{metrics}");
    assert!(metrics.contains("ferrite_inter_token_latency_seconds_bucket"));
    assert!(metrics.contains("ferrite_queue_depth 0"));
    assert!(!metrics.contains("ferrite_generated_tokens_total 0\n"));
}

#[test]
fn f16_weights_serve_what_local_f16_generation_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = trained(dir);
    let server = Server::start_with(&ck, &["--dtype", "f16"]);
    let url = format!("http://{}", server.grpc);
    let flags = ["--prompt", "line", "--max-tokens", "20", "--temperature", "0.9", "--json"];
    let local = json(&ok(&ferrite(
        &[&["generate", "--checkpoint", &ck, "--dtype", "f16"][..], &flags].concat(),
        dir,
    )));
    let remote = json(&ok(&ferrite(&[&["generate", "--server", &url][..], &flags].concat(), dir)));
    for key in ["tokens", "logprobs", "text"] {
        assert_eq!(local[key], remote[key], "{key}");
    }
    // The weights' format is the server's choice, and only two exist.
    let both = ferrite(&["generate", "--server", &url, "--prompt", "x", "--dtype", "f16"], dir);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--dtype"));
    let bad = ferrite(&["generate", "--checkpoint", &ck, "--prompt", "x", "--dtype", "f8"], dir);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`f8` is not a weight dtype"));
}
