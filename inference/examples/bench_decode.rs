//! Decode throughput of the serving path on a GPT-2-124M-shaped model (random weights):
//! batch 1, 128 new tokens; N concurrent streams through the engine (continuous batching);
//! time to first token against prompt length. Prints one JSON line.
//!
//!     cargo run --release -p ferrite-inference --example bench_decode -- [threads] [streams]

use std::sync::Arc;
use std::time::Instant;

use ferrite_data::Tokenizer;
use ferrite_inference::metrics::Metrics;
use ferrite_inference::{Engine, EngineConfig, GenerateRequest, ModelVersion, Prompt, ServedModel};
use ferrite_model::generate::{BatchDecoder, DecodeModel, KvCache, LongPrompt, Sequence};
use ferrite_model::layout::ParamLayout;
use ferrite_model::sample::SamplingParams;
use ferrite_model::GptConfig;

const NEW_TOKENS: usize = 128;

fn random_model(cfg: &GptConfig) -> DecodeModel {
    let n = ParamLayout::new(cfg).len();
    let mut state = 0x9e3779b97f4a7c15u64;
    let params: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect();
    DecodeModel::new(cfg.clone(), params).expect("model")
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7919) % 50_000).collect()
}

fn request(len: usize, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Tokens(prompt(len)),
        max_tokens,
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed },
        stop: Vec::new(),
        logprobs: false,
        long_prompt: LongPrompt::Refuse,
        deadline: None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let streams: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let cfg = GptConfig::gpt2_small(50_257);
    let model = random_model(&cfg);

    // Batch 1 straight on the decoder: 16-token prompt, then 128 tokens.
    let mut dec = BatchDecoder::new(threads).expect("decoder");
    let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1 };
    let run_one = |dec: &mut BatchDecoder| {
        let kv = KvCache::new(&cfg, Sequence::kv_positions(&cfg, 16, NEW_TOKENS));
        let mut seq = Sequence::new(&cfg, &prompt(16), NEW_TOKENS, p, LongPrompt::Refuse, kv)
            .expect("sequence");
        let mut first = None;
        while !seq.finished() {
            let mut input = [seq.input(usize::MAX)];
            let logits = dec.step(&model, &mut input).expect("step");
            seq.sample(&logits[0]);
            first.get_or_insert_with(Instant::now);
        }
        first.expect("a token").elapsed()
    };
    run_one(&mut dec); // warm-up
    let decode = run_one(&mut dec);
    let batch1 = (NEW_TOKENS - 1) as f64 / decode.as_secs_f64();
    drop(dec);

    // Through the engine: time to first token by prompt length, then N streams at once.
    let served =
        ServedModel { version: ModelVersion::default(), model, tokenizer: Tokenizer::gpt2() };
    let ecfg = EngineConfig { max_batch: streams.max(1), threads, ..EngineConfig::default() };
    let engine =
        Engine::start(ecfg, Some(Arc::new(served)), Arc::new(Metrics::default())).expect("engine");
    let h = engine.handle();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
    let rt = rt.expect("runtime");
    let mut ttft = Vec::new();
    for len in [16usize, 64, 256, 512] {
        let t0 = Instant::now();
        rt.block_on(h.generate(request(len, 1, 0))).expect("generate");
        ttft.push(serde_json::json!({"prompt": len, "ms": t0.elapsed().as_secs_f64() * 1e3}));
    }
    let t0 = Instant::now();
    let total: usize = rt.block_on(async {
        let tasks: Vec<_> = (0..streams)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { h.generate(request(16, NEW_TOKENS, i as u64)).await })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += t.await.expect("task").expect("generate").tokens.len();
        }
        n
    });
    let aggregate = total as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"threads": threads, "batch1_tokens_per_s": batch1,
            "streams": streams, "aggregate_tokens_per_s": aggregate, "ttft": ttft})
    );
}
