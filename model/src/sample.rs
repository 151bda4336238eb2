//! Sampling the next token: temperature, then top-k, then top-p (nucleus), then a draw from
//! a counter-based RNG keyed by (seed, position), so a seeded request gives the same text
//! however it is batched.

use ferrite_kernels::cpu::{exp, exp_shifted};
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

/// Candidate sets up to this size are sorted outright; larger ones (the whole vocabulary,
/// unless top-k cuts it) are searched by probability mass without sorting.
const SORT_MAX: usize = 512;

/// Rank order of (token, scaled logit) pairs: most likely first, the lower id first on ties.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Fills `out` with (token, logit / temperature) and keeps the top-k of them (unordered).
fn candidates(logits: &[f32], p: &SamplingParams, out: &mut Vec<(u32, f32)>) {
    out.clear();
    out.extend(logits.iter().enumerate().map(|(i, &z)| (i as u32, z / p.temperature)));
    if p.top_k > 0 && p.top_k < out.len() {
        out.select_nth_unstable_by(p.top_k - 1, by_rank);
        out.truncate(p.top_k);
    }
}

/// The sampling distribution after temperature, top-k and top-p: (token, probability)
/// pairs, most likely first, probabilities summing to 1. Needs `temperature > 0`.
///
/// Sorts every candidate: the reference that [`sample`] agrees with.
pub fn distribution(logits: &[f32], p: &SamplingParams, out: &mut Vec<(u32, f32)>) {
    candidates(logits, p, out);
    out.sort_unstable_by(by_rank);
    normalise_sorted(out, p.top_p);
}

/// Softmax over sorted (token, scaled logit) pairs, then the top-p cut and renormalisation.
/// The exponentials are the kernels' `exp`, which [`crossing`] computes in a vector loop
/// with the same bits.
fn normalise_sorted(out: &mut Vec<(u32, f32)>, top_p: f32) {
    let max = out[0].1;
    let mut sum = 0.0f64;
    for e in out.iter_mut() {
        e.1 = exp(e.1 - max);
        sum += e.1 as f64;
    }
    for e in out.iter_mut() {
        e.1 = (e.1 as f64 / sum) as f32;
    }
    if top_p < 1.0 {
        let mut acc = 0.0f64;
        let mut keep = out.len();
        for (i, e) in out.iter().enumerate() {
            acc += e.1 as f64;
            if acc >= top_p as f64 {
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

/// The token of a sorted distribution whose cumulative probability first exceeds `u`.
fn walk(dist: &[(u32, f32)], u: f64) -> u32 {
    let mut acc = 0.0f64;
    for &(t, pr) in dist {
        acc += pr as f64;
        if u < acc {
            return t;
        }
    }
    dist.last().expect("non-empty").0
}

/// Log-softmax of `logits` at `token`.
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    logits[token as usize] - ferrite_kernels::cpu::log_sum_exp(logits)
}

/// Samples the token at sequence position `position`; `scratch` is reused between calls.
///
/// The token is the one [`distribution`] gives: the first, in rank order, whose cumulative
/// probability exceeds a uniform draw u keyed by (seed, position). For more than
/// `SORT_MAX` (512) candidates the same rule is applied without sorting (the masses are then
/// summed in another order, so a draw within ~1e-12 of a boundary may fall the other side).
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
        let u = Rng::stream(p.seed, mix(position)).next_f64();
        candidates(logits, p, scratch);
        if scratch.len() <= SORT_MAX {
            scratch.sort_unstable_by(by_rank);
            normalise_sorted(scratch, p.top_p);
            walk(scratch, u)
        } else {
            draw_unsorted(scratch, p.top_p, u)
        }
    };
    Sampled { token, logprob: logprob(logits, token) }
}

/// [`sample`]'s draw over many (token, scaled logit) candidates: softmax weights, the top-p
/// nucleus, then the token where the cumulative weight in rank order passes u.
fn draw_unsorted(c: &mut [(u32, f32)], top_p: f32, u: f64) -> u32 {
    let max = c.iter().fold(f32::NEG_INFINITY, |m, e| m.max(e.1));
    let nucleus = if top_p < 1.0 { crossing(c, max, top_p as f64, false) } else { None };
    let kept = match nucleus {
        Some((m, last)) => {
            // The nucleus to the front: every candidate ranked at or before its last one.
            let mut front = 0;
            for i in 0..c.len() {
                if by_rank(&c[i], &last).is_le() {
                    c.swap(i, front);
                    front += 1;
                }
            }
            debug_assert_eq!(front, m);
            m
        }
        None => c.len(),
    };
    let c = &c[..kept];
    match crossing(c, max, u, true) {
        Some((_, t)) => t.0,
        // Rounding left the draw past every token: the least likely, as `walk` does.
        None => c.iter().copied().max_by(by_rank).expect("non-empty").0,
    }
}

/// Buckets of candidates by how far their scaled logit is below the maximum: the candidates'
/// span cut in BUCKETS, or buckets 1/256 apart when it is wider than 32 (the last bucket
/// then takes everything below). A flat distribution (an untrained model, a high
/// temperature) spreads over the buckets as a peaked one does, rather than piling its
/// 50k candidates into a few buckets that then have to be sorted.
const BUCKETS: usize = 8192;
const _: () = assert!(BUCKETS <= 1 << 16, "bucket keys are u16");
const MIN_BUCKETS_PER_UNIT: f32 = 256.0;

/// For candidates (token, scaled logit) with weights exp(logit - max): the smallest m such
/// that the weight of the m best in rank order reaches `frac` of the total (exceeds it when
/// `strict`), and the m-th best. None when no prefix does (rounding, with `frac` near 1).
///
/// Candidates are bucketed by logit (buckets are ordered like the ranks); only the bucket
/// where the cumulative weight crosses is gathered and sorted. (Moving every candidate of
/// the better buckets to the front instead cost a mispredicted branch per candidate.)
fn crossing(c: &[(u32, f32)], max: f32, frac: f64, strict: bool) -> Option<(usize, (u32, f32))> {
    CROSSING.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        let Crossing { mass, count, bucket, keys, weights } = scratch;
        let span = max - c.iter().fold(max, |m, e| m.min(e.1));
        let per_unit = if span > 0.0 {
            (BUCKETS as f32 / span).max(MIN_BUCKETS_PER_UNIT)
        } else {
            MIN_BUCKETS_PER_UNIT
        };
        // In range before the conversion (NaN too: `min` takes the other operand), so that
        // the loop needs no saturation checks.
        let key = |v: f32| ((max - v) * per_unit).min((BUCKETS - 1) as f32) as u16;
        let weight = |v: f32| exp(v - max) as f64;
        // Keys and weights first, the exponentials in one vector loop (libm's, one call per
        // candidate, were a third of a token's draw), then the tallies.
        keys.clear();
        keys.extend(c.iter().map(|e| key(e.1)));
        weights.clear();
        weights.extend(c.iter().map(|e| e.1));
        exp_shifted(weights, max);
        mass.clear();
        mass.resize(BUCKETS, 0.0);
        count.clear();
        count.resize(BUCKETS, 0);
        for (&k, &w) in keys.iter().zip(weights.iter()) {
            mass[k as usize] += w as f64;
            count[k as usize] += 1;
        }
        let target = frac * mass.iter().sum::<f64>();
        let crosses = |acc: f64| if strict { acc > target } else { acc >= target };
        let (mut acc, mut before) = (0.0f64, 0usize);
        let kb = (0..BUCKETS as u16).find(|&k| {
            let k = k as usize;
            if count[k] > 0 && crosses(acc + mass[k]) {
                return true;
            }
            acc += mass[k];
            before += count[k] as usize;
            false
        })?;
        bucket.clear();
        bucket.extend(c.iter().zip(keys.iter()).filter(|e| *e.1 == kb).map(|e| *e.0));
        bucket.sort_unstable_by(by_rank);
        for (j, &e) in bucket.iter().enumerate() {
            acc += weight(e.1);
            if crosses(acc) {
                return Some((before + j + 1, e));
            }
        }
        // The bucket's total crossed but its terms added one by one did not (rounding).
        bucket.last().map(|&e| (before + bucket.len(), e))
    })
}

/// [`crossing`]'s buffers, kept per thread so that a token's draw allocates nothing.
#[derive(Default)]
struct Crossing {
    /// Weight and number of candidates per bucket.
    mass: Vec<f64>,
    count: Vec<u32>,
    /// The crossing bucket's candidates.
    bucket: Vec<(u32, f32)>,
    /// Each candidate's bucket and weight.
    keys: Vec<u16>,
    weights: Vec<f32>,
}

thread_local! {
    static CROSSING: std::cell::RefCell<Crossing> = std::cell::RefCell::default();
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

    /// The reference: sort every candidate ([`distribution`]), then walk.
    fn sample_sorted(logits: &[f32], p: &SamplingParams, position: u64) -> u32 {
        let mut d = Vec::new();
        distribution(logits, p, &mut d);
        walk(&d, Rng::stream(p.seed, mix(position)).next_f64())
    }

    #[test]
    fn unsorted_draw_over_a_large_vocabulary_matches_the_sorted_reference() {
        let mut rng = Rng::new(5);
        // Flat logits (a high temperature), peaked ones (a trained model), many exact ties.
        let flat: Vec<f32> = (0..50_257).map(|_| rng.next_f64() as f32 * 0.5).collect();
        let peaked: Vec<f32> = (0..50_257)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 2.0)
            .map(|x| x * x * x * 20.0)
            .collect();
        let ties: Vec<f32> = (0..3000).map(|i| (i % 7) as f32 * 0.25).collect();
        // An untrained model's: every logit within 0.005 of the others.
        let flatter: Vec<f32> = flat.iter().map(|x| x * 0.01).collect();
        for logits in [&flat, &peaked, &ties, &flatter] {
            for (temperature, top_k, top_p) in
                [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 2000, 1.0), (1.0, 1000, 0.5), (2.0, 0, 0.3)]
            {
                for seed in 0..40u64 {
                    let p = SamplingParams { temperature, top_k, top_p, seed };
                    let got = sample(logits, &p, seed * 3 + 1, &mut Vec::new()).token;
                    let want = sample_sorted(logits, &p, seed * 3 + 1);
                    assert_eq!(got, want, "T={temperature} k={top_k} p={top_p} seed={seed}");
                }
            }
        }
    }

    #[test]
    fn logprob_is_the_log_softmax() {
        let mut rng = Rng::new(9);
        let logits: Vec<f32> = (0..50_257).map(|_| (rng.next_f64() as f32 - 0.5) * 12.0).collect();
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        for t in [0u32, 17, 50_256] {
            let want = logits[t as usize] as f64 - lse;
            let got = logprob(&logits, t) as f64;
            assert!((got - want).abs() < 1e-5, "token {t}: {got} vs {want}");
        }
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let p = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
    }
}
