//! Row softmax shared by attention and cross-entropy: vectorised max, exp and sum over
//! one row, in lane order (see `math::fold_lanes`), so each row is one exp pass.

use crate::math;

/// e^x with the bits of every vector loop of these kernels ([`exp_shifted`], the softmaxes),
/// whatever the CPU: relative error below 2e-7 where the result is a normal float, inputs
/// clamped to [-87.3, 88.3].
pub fn exp(x: f32) -> f32 {
    math::exp(x)
}

math::multiversion! {
    /// x = e^(x - shift), elementwise: element by element the bits of [`exp`]`(x - shift)`.
    pub fn exp_shifted(x: &mut [f32], shift: f32) {
        for v in x.iter_mut() {
            *v = math::exp(*v - shift);
        }
    }
}

math::multiversion! {
    /// x becomes softmax(x) in place; returns its log-sum-exp, ln Σ e^x (-inf when empty).
    pub(crate) fn softmax(x: &mut [f32]) -> f32 {
        let max = math::max(x);
        for v in x.iter_mut() {
            *v = math::exp(*v - max);
        }
        let sum = math::sum(x);
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
        max + sum.ln()
    }
}

math::multiversion! {
    /// ln Σ e^x, leaving `x` as it is (-inf when empty): the max, then the exponentials
    /// summed in lanes. For the log-probability of a sampled token over a whole vocabulary,
    /// where libm's `exp` per element cost a quarter of a millisecond.
    pub fn log_sum_exp(x: &[f32]) -> f32 {
        let max = math::max(x);
        if max == f32::NEG_INFINITY {
            return max;
        }
        max + math::fold_lanes(x, 0.0, |a, v| a + math::exp(v - max), |a, b| a + b).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_naive_and_returns_log_sum_exp_for_all_tail_lengths() {
        for n in 1..70 {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.73).sin() * 9.0).collect();
            let lse = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            let mut p = x.clone();
            let got = softmax(&mut p);
            assert!((got as f64 - lse).abs() < 1e-5, "n={n}: lse {got} vs {lse}");
            for (pi, xi) in p.iter().zip(&x) {
                assert!((*pi as f64 - (*xi as f64 - lse).exp()).abs() < 1e-6, "n={n}");
            }
            assert_eq!(log_sum_exp(&x), got, "n={n}: the same sum as softmax's");
            let mut e = x.clone();
            exp_shifted(&mut e, got);
            for ((ei, pi), xi) in e.iter().zip(&p).zip(&x) {
                assert!((ei - pi).abs() < 1e-6, "n={n}: exp_shifted by lse is the softmax");
                // The vector loop (this CPU's widest) has the bits of the scalar `exp`.
                assert_eq!(ei.to_bits(), exp(xi - got).to_bits(), "n={n}");
            }
        }
    }
}
