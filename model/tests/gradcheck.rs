//! The whole model's backward against finite differences of its loss, and the loss at
//! initialisation against ln(vocab).

use ferrite_kernels::{Backend, CpuBackend, IGNORE_INDEX};
use ferrite_model::{Gpt, GptConfig};

fn tiny() -> GptConfig {
    GptConfig { n_layer: 2, n_head: 2, n_embd: 8, block_size: 6, vocab_size: 11 }
}

fn batch(b: usize, t: usize) -> (Vec<i32>, Vec<i32>) {
    let tokens: Vec<i32> = (0..b * t).map(|i| ((i * 7 + 3) % 11) as i32).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|i| ((i * 5 + 1) % 11) as i32).collect();
    targets[2] = IGNORE_INDEX;
    (tokens, targets)
}

#[test]
fn model_backward_matches_finite_differences() {
    let be = CpuBackend::new(2).unwrap();
    let (b, t) = (2, 6);
    let mut gpt = Gpt::new(&be, tiny(), b, t).unwrap();
    gpt.init_gpt2(&be, 1).unwrap();
    // Weights larger than GPT-2's 0.02 so every path carries a measurable gradient, and
    // non-trivial biases and LayerNorm gains.
    let mut params: Vec<f32> = gpt.params.clone();
    for (i, x) in params.iter_mut().enumerate() {
        let noise = ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.2;
        *x = if *x == 0.0 || *x == 1.0 { *x + noise } else { *x * 10.0 };
    }
    let pad = (tiny().padded_vocab() - tiny().vocab_size) * 8;
    let wte_real = tiny().vocab_size * 8;
    for x in &mut params[wte_real..wte_real + pad] {
        *x = 0.0;
    }
    let (tokens, targets) = batch(b, t);
    be.upload(&mut gpt.params, &params).unwrap();
    gpt.zero_grad(&be);
    let loss = gpt.forward(&be, &tokens, Some(&targets), b, t).unwrap().unwrap();
    assert_eq!(loss.counted, b * t - 1);
    gpt.backward(&be, loss, 1.0).unwrap();
    let grads = gpt.grads.clone();

    let eps = 1e-2f32;
    let mut checked = 0;
    for i in (0..params.len()).step_by(7) {
        if (wte_real..wte_real + pad).contains(&i) {
            assert_eq!(grads[i], 0.0, "padding row {i} got a gradient");
            continue;
        }
        let mut p = params.clone();
        p[i] += eps;
        be.upload(&mut gpt.params, &p).unwrap();
        let up = gpt.forward(&be, &tokens, Some(&targets), b, t).unwrap().unwrap().mean as f64;
        p[i] -= 2.0 * eps;
        be.upload(&mut gpt.params, &p).unwrap();
        let down = gpt.forward(&be, &tokens, Some(&targets), b, t).unwrap().unwrap().mean as f64;
        let num = ((up - down) / (2.0 * eps as f64)) as f32;
        assert!(
            (grads[i] - num).abs() <= 3e-3 + 3e-2 * num.abs(),
            "param {i}: analytic {}, numeric {num}",
            grads[i]
        );
        checked += 1;
    }
    assert!(checked > 100);
}

#[test]
fn loss_at_initialisation_is_near_ln_vocab() {
    let be = CpuBackend::new(1).unwrap();
    let cfg = GptConfig { n_layer: 2, n_head: 4, n_embd: 32, block_size: 16, vocab_size: 65 };
    let mut gpt = Gpt::new(&be, cfg, 4, 16).unwrap();
    gpt.init_gpt2(&be, 1337).unwrap();
    let tokens: Vec<i32> = (0..64).map(|i| i * 13 % 65).collect();
    let targets: Vec<i32> = (0..64).map(|i| i * 29 % 65).collect();
    let loss = gpt.forward(&be, &tokens, Some(&targets), 4, 16).unwrap().unwrap();
    assert!((loss.mean - (65f32).ln()).abs() < 0.1, "loss {}", loss.mean);
}

#[test]
fn out_of_vocabulary_token_is_an_error_not_a_panic() {
    let be = CpuBackend::new(1).unwrap();
    let mut gpt = Gpt::new(&be, tiny(), 1, 6).unwrap();
    let err = gpt.forward(&be, &[0, 1, 2, 3, 4, 11], None, 1, 6).unwrap_err();
    assert!(err.to_string().contains("token id 11"), "{err}");
}
