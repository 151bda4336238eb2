//! KV-cached decoding agrees with the training forward pass, and sampling is reproducible.

use ferrite_kernels::CpuBackend;
use ferrite_model::generate::{Generator, WeightDtype};
use ferrite_model::sample::SamplingParams;
use ferrite_model::{Gpt, GptConfig};

fn model() -> (GptConfig, Vec<f32>, Gpt<CpuBackend>, CpuBackend) {
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 16, block_size: 12, vocab_size: 23 };
    let be = CpuBackend::new(2).unwrap();
    let mut gpt = Gpt::new(&be, cfg.clone(), 1, 12).unwrap();
    gpt.init_gpt2(&be, 3).unwrap();
    // Larger weights than at initialisation, so positions differ visibly.
    let params: Vec<f32> = gpt.params.iter().map(|x| x * 15.0).collect();
    gpt.params.copy_from_slice(&params);
    (cfg, params, gpt, be)
}

#[test]
fn cached_decoding_matches_the_full_forward_at_every_position() {
    let (cfg, params, mut gpt, be) = model();
    let tokens: Vec<u32> = vec![3, 17, 5, 5, 22, 0, 9, 11, 4, 1];
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    gpt.forward(&be, &ids, None, 1, tokens.len()).unwrap();
    let mut want = vec![0.0; cfg.vocab_size];

    let mut g = Generator::new(cfg.clone(), params, 2, WeightDtype::F32).unwrap();
    // A prefill of 4, then one token at a time.
    let logits = g.feed(&tokens[..4]).unwrap().to_vec();
    gpt.logits(&be, 3, &mut want).unwrap();
    assert_close(&logits, &want, 3);
    for (i, &tok) in tokens.iter().enumerate().skip(4) {
        let logits = g.feed(&[tok]).unwrap().to_vec();
        gpt.logits(&be, i, &mut want).unwrap();
        assert_close(&logits, &want, i);
    }
}

fn assert_close(got: &[f32], want: &[f32], pos: usize) {
    for (j, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "position {pos} logit {j}: {a} vs {b}");
    }
}

#[test]
fn same_seed_same_tokens_and_greedy_is_deterministic() {
    let (cfg, params, _, _) = model();
    let mut g = Generator::new(cfg, params, 1, WeightDtype::F32).unwrap();
    let p = SamplingParams { temperature: 0.9, top_k: 10, top_p: 0.95, seed: 7 };
    let a: Vec<u32> =
        g.generate(&[1, 2, 3], 30, &p, |_| true).unwrap().iter().map(|s| s.token).collect();
    let b: Vec<u32> =
        g.generate(&[1, 2, 3], 30, &p, |_| true).unwrap().iter().map(|s| s.token).collect();
    assert_eq!(a, b);
    assert_eq!(a.len(), 30, "runs past the 12-token context by rebuilding the cache");
    let other = SamplingParams { seed: 8, ..p };
    let c: Vec<u32> =
        g.generate(&[1, 2, 3], 30, &other, |_| true).unwrap().iter().map(|s| s.token).collect();
    assert_ne!(a, c);
}

#[test]
fn stop_callback_ends_generation() {
    let (cfg, params, _, _) = model();
    let mut g = Generator::new(cfg, params, 1, WeightDtype::F32).unwrap();
    let p = SamplingParams { temperature: 0.0, ..Default::default() };
    let mut seen = 0;
    let out = g
        .generate(&[1], 10, &p, |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
    assert_eq!(out.len(), 3);
}

#[test]
fn f16_weights_decode_close_to_f32_and_chunking_keeps_their_bits() {
    let (cfg, params, _, _) = model();
    let tokens: Vec<u32> = vec![3, 17, 5, 5, 22, 0, 9, 11];
    let mut full = Generator::new(cfg.clone(), params.clone(), 2, WeightDtype::F32).unwrap();
    let want = full.feed(&tokens).unwrap().to_vec();
    let mut half = Generator::new(cfg.clone(), params.clone(), 2, WeightDtype::F16).unwrap();
    let got = half.feed(&tokens).unwrap().to_vec();
    assert_ne!(got, want, "f16 weights are rounded");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 2e-2 * scale, "logit {j}: {a} (f16) vs {b} (f32)");
    }
    // One token at a time gives the same bits as the prompt in one piece.
    let mut steps = Generator::new(cfg, params, 1, WeightDtype::F16).unwrap();
    let mut last = Vec::new();
    for &t in &tokens {
        last = steps.feed(&[t]).unwrap().to_vec();
    }
    assert_eq!(last, got);
}

#[test]
fn weights_outside_f16_range_are_refused_for_f16_and_kept_for_f32() {
    let (cfg, mut params, _, _) = model();
    params[0] = 1e6; // the first token embedding
    let err = Generator::new(cfg.clone(), params.clone(), 1, WeightDtype::F16).err().unwrap();
    assert!(err.to_string().contains("Wte holds 1000000, outside f16's range"), "{err}");
    assert!(Generator::new(cfg, params, 1, WeightDtype::F32).is_ok());
}

#[test]
fn bf16_weights_decode_close_to_f32_and_chunking_keeps_their_bits() {
    let (cfg, params, _, _) = model();
    let tokens: Vec<u32> = vec![3, 17, 5, 5, 22, 0, 9, 11];
    let made = Generator::new(cfg.clone(), params.clone(), 2, WeightDtype::Bf16);
    if !ferrite_kernels::cpu::amx::available() {
        // Refused by name where the CPU cannot run it.
        let err = made.err().expect("bf16 without AMX is refused").to_string();
        assert!(err.contains("AMX-BF16"), "{err}");
        eprintln!("bf16 decoding skipped: this CPU has no AMX-BF16 (the refusal was checked)");
        return;
    }
    let mut bf16 = made.unwrap();
    let got = bf16.feed(&tokens).unwrap().to_vec();
    let mut full = Generator::new(cfg.clone(), params.clone(), 2, WeightDtype::F32).unwrap();
    let want = full.feed(&tokens).unwrap().to_vec();
    assert_ne!(got, want, "bf16 products are rounded");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 5e-2 * scale, "logit {j}: {a} (bf16) vs {b} (f32)");
    }
    // Each row's products are its own: one token at a time gives the prompt's bits.
    let mut steps = Generator::new(cfg, params, 1, WeightDtype::Bf16).unwrap();
    let mut last = Vec::new();
    for &t in &tokens {
        last = steps.feed(&[t]).unwrap().to_vec();
    }
    assert_eq!(last, got);
}
