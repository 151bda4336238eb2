//! Prometheus metrics of the serving role, kept in atomics and written in the text
//! exposition format by hand (a handful of series does not need a client library).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24];

/// A cumulative histogram of durations.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

/// Everything `/metrics` shows.
#[derive(Default)]
pub struct Metrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_sequences: AtomicU64,
    pub kv_cache_bytes_used: AtomicU64,
    /// Decode throughput over the last window, as f64 bits.
    tokens_per_second: AtomicU64,
    window: Mutex<Option<(Instant, u64)>>,
}

impl Metrics {
    /// Counts `n` generated tokens and refreshes the tokens/s gauge about once a second.
    pub fn add_generated(&self, n: u64) {
        let total = self.generated_tokens.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        let mut w = self.window.lock().expect("metrics window");
        match *w {
            Some((since, at)) if now.duration_since(since) >= Duration::from_secs(1) => {
                let rate = (total - at) as f64 / now.duration_since(since).as_secs_f64();
                self.tokens_per_second.store(rate.to_bits(), Ordering::Relaxed);
                *w = Some((now, total));
            }
            Some(_) => {}
            None => *w = Some((now, total - n)),
        }
    }

    pub fn tokens_per_second(&self) -> f64 {
        f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.time_to_first_token.write(
            &mut out,
            "ferrite_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.inter_token_latency.write(
            &mut out,
            "ferrite_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
        );
        let g = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        g(
            &mut out,
            "ferrite_generated_tokens_total",
            "counter",
            "Tokens generated.",
            ld(&self.generated_tokens),
        );
        g(
            &mut out,
            "ferrite_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            ld(&self.prompt_tokens),
        );
        g(&mut out, "ferrite_requests_total", "counter", "Requests accepted.", ld(&self.requests));
        g(
            &mut out,
            "ferrite_requests_rejected_total",
            "counter",
            "Requests refused (queue full, bad parameters).",
            ld(&self.rejected),
        );
        g(
            &mut out,
            "ferrite_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last second of decoding.",
            self.tokens_per_second().to_string(),
        );
        g(
            &mut out,
            "ferrite_queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            ld(&self.queue_depth),
        );
        g(
            &mut out,
            "ferrite_active_sequences",
            "gauge",
            "Sequences in the running batch.",
            ld(&self.active_sequences),
        );
        g(
            &mut out,
            "ferrite_kv_cache_bytes_used",
            "gauge",
            "KV cache memory held by running sequences.",
            ld(&self.kv_cache_bytes_used),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token.observe(Duration::from_millis(3));
        m.time_to_first_token.observe(Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("ferrite_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("ferrite_time_to_first_token_seconds_bucket{le=\"0.04\"} 2"));
        assert!(text.contains("ferrite_time_to_first_token_seconds_count 2"));
    }
}
