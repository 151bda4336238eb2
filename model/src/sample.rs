//! Sampling the next token: temperature, then top-k, then top-p (nucleus), then a draw from
//! a counter-based RNG keyed by (seed, position), so a seeded request gives the same text
//! however it is batched.

use serde::{Deserialize, Serialize};

use crate::rng::{mix, Rng};
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Errors name the parameter that is out of range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: &str| Err(ModelError::Sampling(what.to_string()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        Ok(())
    }
}

/// One sampled token with the model's log-probability of it (the unmodified distribution).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// The sampling distribution after temperature, top-k and top-p: (token, probability)
/// pairs, most likely first, probabilities summing to 1. Needs `temperature > 0`.
pub fn distribution(logits: &[f32], p: &SamplingParams, out: &mut Vec<(u32, f32)>) {
    out.clear();
    out.extend(logits.iter().enumerate().map(|(i, &z)| (i as u32, z / p.temperature)));
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < out.len() {
        out.truncate(p.top_k);
    }
    let max = out[0].1;
    let mut sum = 0.0f64;
    for e in out.iter_mut() {
        e.1 = (e.1 - max).exp();
        sum += e.1 as f64;
    }
    for e in out.iter_mut() {
        e.1 = (e.1 as f64 / sum) as f32;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0f64;
        let mut keep = out.len();
        for (i, e) in out.iter().enumerate() {
            acc += e.1 as f64;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        out.truncate(keep);
        let kept: f64 = out.iter().map(|e| e.1 as f64).sum();
        for e in out.iter_mut() {
            e.1 = (e.1 as f64 / kept) as f32;
        }
    }
}

/// Log-softmax of `logits` at `token`.
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max as f64 + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
    (logits[token as usize] as f64 - lse) as f32
}

/// Samples the token at sequence position `position`; `scratch` is reused between calls.
pub fn sample(
    logits: &[f32],
    p: &SamplingParams,
    position: u64,
    scratch: &mut Vec<(u32, f32)>,
) -> Sampled {
    let token = if p.temperature == 0.0 {
        // Greedy; the lowest id wins ties.
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        best as u32
    } else {
        distribution(logits, p, scratch);
        let u = Rng::stream(p.seed, mix(position)).next_f64();
        let mut acc = 0.0f64;
        let mut chosen = scratch.last().expect("non-empty").0;
        for &(t, pr) in scratch.iter() {
            acc += pr as f64;
            if u < acc {
                chosen = t;
                break;
            }
        }
        chosen
    };
    Sampled { token, logprob: logprob(logits, token) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 6] = [1.0, 3.0, 0.5, 2.0, -1.0, 2.5];

    #[test]
    fn top_k_one_equals_greedy() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let g = sample(&LOGITS, &greedy, 0, &mut Vec::new()).token;
        assert_eq!(g, 1);
        for seed in 0..20 {
            let p = SamplingParams { temperature: 1.3, top_k: 1, top_p: 1.0, seed };
            assert_eq!(sample(&LOGITS, &p, seed * 7, &mut Vec::new()).token, g);
        }
    }

    #[test]
    fn temperature_scales_logits_before_softmax() {
        let p = SamplingParams { temperature: 0.5, ..Default::default() };
        let mut d = Vec::new();
        distribution(&LOGITS, &p, &mut d);
        let z: f64 = LOGITS.iter().map(|&x| (x as f64 / 0.5).exp()).sum();
        for &(t, pr) in &d {
            let want = (LOGITS[t as usize] as f64 / 0.5).exp() / z;
            assert!((pr as f64 - want).abs() < 1e-6, "token {t}: {pr} vs {want}");
        }
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        // Probabilities at T=1, sorted: tokens 1, 5, 3, 0, 2, 4.
        let z: f64 = LOGITS.iter().map(|&x| (x as f64).exp()).sum();
        let pr = |t: usize| (LOGITS[t] as f64).exp() / z;
        let first_two = pr(1) + pr(5);
        // Just above the top two's mass: the nucleus needs a third token.
        let p = SamplingParams { top_p: (first_two + 1e-3) as f32, ..Default::default() };
        let mut d = Vec::new();
        distribution(&LOGITS, &p, &mut d);
        assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 5, 3]);
        // Just below: two suffice.
        let p = SamplingParams { top_p: (first_two - 1e-3) as f32, ..Default::default() };
        distribution(&LOGITS, &p, &mut d);
        assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 5]);
        let total: f32 = d.iter().map(|e| e.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn same_seed_and_position_give_the_same_token() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42 };
        let a: Vec<u32> = (0..50).map(|i| sample(&LOGITS, &p, i, &mut Vec::new()).token).collect();
        let b: Vec<u32> = (0..50).map(|i| sample(&LOGITS, &p, i, &mut Vec::new()).token).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "sampling at T=1 should vary across positions");
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let p = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
    }
}
