//! Observability with real processes on 127.0.0.1: `ferrite job plot`, Prometheus `/metrics`
//! on the coordinator and the workers, JSON logs with the rank's spans, and the `/ui`
//! dashboard in headless Chromium. Every process binds port 0; the harness reads its
//! addresses from its `READY addr=… http=…` line.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::Cluster;

/// A coordinator and `workers` workers, all with `--http-listen` and logs in `log_format`,
/// and a small corpus.
fn start(workers: usize, log_format: &str) -> Cluster {
    let extra = ["--http-listen", "127.0.0.1:0", "--log-format", log_format];
    let cluster = Cluster::start_full(None, 1, workers, "2s", &extra);
    cluster.prepare_data();
    cluster
}

/// Runs a job of 20 steps (eval and checkpoint every 10) to its end; returns its id.
fn run_job(cluster: &Cluster, workers: usize) -> String {
    let job = cluster.job("tiny", workers, 4, 20, "out");
    let (out, id) = cluster.submit(&job, true);
    cluster.ok(&out);
    id
}

/// `GET path` over HTTP/1.1; (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, body.to_owned())
}

/// The value of the sample `name` (with its labels, exactly) in a metrics page.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A PNG's (width, height, RGBA pixels).
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 4]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG pixels");
    let bytes = &buf[..info.buffer_size()];
    let pixels = match info.color_type {
        png::ColorType::Rgb => bytes.chunks(3).map(|p| [p[0], p[1], p[2], 255]).collect(),
        png::ColorType::Rgba => bytes.chunks(4).map(|p| [p[0], p[1], p[2], p[3]]).collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, pixels)
}

#[test]
fn job_plot_writes_png_and_svg_with_train_loss_val_loss_and_learning_rate() {
    let cluster = start(1, "text");
    let id = run_job(&cluster, 1);

    let png_path = cluster.path("loss.png");
    let args = ["job", "plot", &id, "--out", png_path.to_str().unwrap()];
    cluster.ok(&cluster.cli(&[&args[..], &["--width", "800", "--height", "500"]].concat()));
    let (w, h, pixels) = decode_png(&png_path);
    assert_eq!((w, h), (800, 500));
    let white = pixels.iter().filter(|p| p[..3] == [255, 255, 255]).count();
    assert!(white > pixels.len() / 2, "mostly background");
    // The three series' colours (train blue, val orange, learning rate green) are drawn.
    for (name, rgb) in [("train", [31, 119, 180]), ("val", [255, 127, 14]), ("lr", [44, 160, 44])] {
        let n = pixels.iter().filter(|p| p[..3] == rgb).count();
        assert!(n > 50, "{name} series: {n} pixels of {rgb:?}");
    }
    // Dark pixels: axes, ticks and text.
    assert!(pixels.iter().filter(|p| p[..3].iter().all(|&c| c < 60)).count() > 500);

    let svg_path = cluster.path("loss.svg");
    let out = cluster.cli(&["job", "plot", &id, "--out", svg_path.to_str().unwrap()]);
    cluster.ok(&out);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("<svg") && svg.contains(r#"width="1000""#), "{}", &svg[..200]);
    for text in ["train loss", "val loss", "learning rate", "step", &id] {
        assert!(svg.contains(text), "the SVG lacks {text:?}");
    }
    // train loss, val loss, learning rate (plus the legend's samples).
    let lines = svg.matches("<polyline").count();
    assert!(lines >= 3, "{lines} polylines");
    let train = svg.lines().find(|l| l.contains("<polyline") && l.contains("#1F77B4"));
    let points = train.expect("the train loss line").matches(',').count();
    assert_eq!(points, 20, "one vertex per step");

    let out = cluster.cli(&["job", "plot", &id, "--out", "loss.jpg"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".png or .svg"));
    let out = cluster.cli(&["job", "plot", "job-999999", "--out", svg_path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn coordinator_and_workers_serve_prometheus_metrics_and_json_logs_carry_the_rank() {
    let cluster = start(2, "json");
    let id = run_job(&cluster, 2);
    let http = cluster.coordinators[0].field("http");

    let (status, text) = http_get(&http, "/metrics");
    assert_eq!(status, 200);
    let job = |name: &str| sample(&text, &format!("{name}{{job=\"{id}\"}}"));
    assert_eq!(sample(&text, "ferrite_jobs{state=\"succeeded\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ferrite_jobs{state=\"running\"}"), Some(0.0));
    assert_eq!(sample(&text, "ferrite_workers_alive"), Some(2.0));
    assert_eq!(sample(&text, "ferrite_coordinator_leader"), Some(1.0), "the sole one leads");
    for w in &cluster.workers {
        let series =
            format!("ferrite_worker_heartbeat_age_seconds{{worker=\"{}\"}}", w.field("worker"));
        let age = sample(&text, &series).unwrap_or_else(|| panic!("{series}\n{text}"));
        assert!((0.0..5.0).contains(&age), "{series} {age}");
    }
    assert_eq!(job("ferrite_job_step"), Some(20.0), "{text}");
    assert!(job("ferrite_job_step_seconds").is_some_and(|s| s > 0.0));
    assert!(job("ferrite_job_tokens_per_second").is_some_and(|t| t > 0.0));
    let mfu = job("ferrite_job_mfu").expect("an MFU");
    assert!(mfu > 0.0 && mfu < 1.0, "MFU {mfu}");
    assert_eq!(job("ferrite_job_checkpoints"), Some(2.0));
    assert_eq!(job("ferrite_job_last_checkpoint_step"), Some(20.0));
    assert!(job("ferrite_job_last_checkpoint_bytes").is_some_and(|b| b > 10_000.0));

    let mut checkpoints_written = 0.0;
    for w in &cluster.workers {
        let (status, text) = http_get(&w.field("http"), "/metrics");
        assert_eq!(status, 200);
        assert_eq!(sample(&text, "ferrite_worker_steps_total"), Some(20.0), "{text}");
        assert_eq!(sample(&text, "ferrite_worker_step_seconds_count"), Some(20.0));
        assert_eq!(sample(&text, "ferrite_worker_allreduce_seconds_count"), Some(20.0));
        let bytes = sample(&text, "ferrite_worker_allreduce_bytes_total").unwrap();
        assert!(bytes > 0.0 && bytes % 20.0 == 0.0, "{bytes}: one gradient buffer per step");
        let rank = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ferrite_worker_step{{job=\"{id}\",rank=\"")))
            .expect("the step gauge names the job and rank");
        assert!(rank.ends_with("\"} 20"), "{rank}");
        assert!(text.contains("ferrite_worker_tokens_per_second{"), "{text}");
        checkpoints_written += sample(&text, "ferrite_worker_checkpoints_written_total").unwrap();
        if rank.starts_with('0') {
            assert!(sample(&text, "ferrite_worker_checkpoint_bytes_last").unwrap() > 10_000.0);
            assert!(sample(&text, "ferrite_worker_checkpoint_write_seconds_last").unwrap() > 0.0);
        }
    }
    assert_eq!(checkpoints_written, 2.0, "rank 0 wrote both checkpoints");

    // Every log line is one JSON object; the checkpoint's carries job, rank and step spans.
    let mut found = false;
    for n in 0..2 {
        let log = std::fs::read_to_string(cluster.path(&format!("worker-{n}.log"))).unwrap();
        for line in log.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if v["fields"]["message"] == "checkpoint written" && v["span"]["step"] == 20 {
                let spans = v["spans"].as_array().unwrap();
                let rank = spans.iter().find(|s| s["name"] == "rank").expect("a rank span");
                assert_eq!(rank["job"], id.as_str(), "{line}");
                assert_eq!(rank["rank"], 0, "{line}");
                found = true;
            }
        }
    }
    assert!(found, "no checkpoint log line with spans\n{}", cluster.logs());
    let log = std::fs::read_to_string(cluster.path("coordinator-0.log")).unwrap();
    assert!(log.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{log}");
}

/// `$FERRITE_CHROMIUM`, or Debian's `chromium`; `None` (the test skips, saying so) where
/// there is none, except under `CI=true`, where scripts/install-deps.sh installed it.
fn chromium() -> Option<String> {
    let candidates = match std::env::var("FERRITE_CHROMIUM") {
        Ok(c) => vec![c],
        Err(_) => vec!["chromium".to_owned(), "chromium-browser".to_owned()],
    };
    let found = candidates.into_iter().find(|c| {
        let version = Command::new(c).arg("--version").stderr(Stdio::null()).output();
        version.is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "chromium not found; scripts/install-deps.sh installs it");
        eprintln!("skipping: chromium not found (scripts/install-deps.sh installs it)");
    }
    found
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn headless(bin: &str, profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .args(["--no-first-run", "--hide-scrollbars", "--virtual-time-budget=5000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_jobs_workers_and_loss_curves_in_headless_chromium() {
    let cluster = start(1, "text");
    let id = run_job(&cluster, 1);
    let http = cluster.coordinators[0].field("http");
    let worker = cluster.workers[0].field("worker");

    // The JSON API the page draws from.
    let (status, body) = http_get(&http, "/api/jobs");
    assert_eq!(status, 200);
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jobs["jobs"][0]["id"], id.as_str(), "{jobs}");
    assert_eq!(jobs["jobs"][0]["state"], "succeeded");
    let (_, body) = http_get(&http, &format!("/api/jobs/{id}/metrics?since=15"));
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let steps: Vec<u64> =
        m["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![16, 17, 18, 19, 20]);
    assert_eq!(http_get(&http, "/api/jobs/job-999999").0, 404);
    assert_eq!(http_get(&http, "/api/jobs/nonsense/metrics").0, 400);
    let (_, page) = http_get(&http, "/ui");
    // Offline: nothing to fetch but the API (the SVG namespace is a name, not a request).
    let page = page.replace("http://www.w3.org/2000/svg", "");
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"));
    assert!(page.contains("/api/jobs") && !page.contains("<script src") && !page.contains("<link"));

    let Some(bin) = chromium() else { return };
    let url = format!("http://{http}/ui");
    let dom = headless(&bin, &cluster.path("chromium-dom"), &url, &["--dump-dom"]);
    for text in [id.as_str(), "SUCCEEDED", worker.as_str(), "tiny"] {
        assert!(dom.contains(text), "the page lacks {text:?}:\n{dom}");
    }
    let curve = dom
        .split("<polyline")
        .skip(1)
        .find(|p| p.contains(r#"class="train""#))
        .expect("a train loss curve");
    let points = curve.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert_eq!(points.split_whitespace().count(), 20, "one vertex per step: {points}");
    assert!(dom.contains(r#"class="val""#), "a val loss curve");

    let shot = cluster.path("ui.png");
    let screenshot = format!("--screenshot={}", shot.display());
    headless(&bin, &cluster.path("chromium-shot"), &url, &[&screenshot, "--window-size=1200,900"]);
    let (w, h, pixels) = decode_png(&shot);
    assert_eq!((w, h), (1200, 900));
    let first = pixels[0];
    let differing = pixels.iter().filter(|p| **p != first).count();
    assert!(differing > pixels.len() / 100, "the screenshot is blank");
    let blue = pixels.iter().filter(|p| p[2] > 150 && p[0] < 60 && p[1] > 80 && p[1] < 130);
    assert!(blue.count() > 30, "no train loss curve drawn");
}
