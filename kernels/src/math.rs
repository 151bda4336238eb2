//! Scalar helpers written so that LLVM vectorises the loops that call them: fixed-width
//! lane accumulators for dot products, and a branch-free `exp` (libm's `expf` is a call per
//! element and keeps GELU and softmax scalar).

pub(crate) const LANES: usize = 16;

/// Defines `fn $name(args)` whose body is compiled three times (AVX-512, AVX2 + FMA, and
/// the baseline) and picks the widest the CPU has at run time. The body is the same code,
/// and Rust never contracts a*b+c into an FMA on its own, so every version gives the same
/// bits.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Dot product with `LANES` independent accumulators (a fixed summation order). Always
/// inlined, so that it takes the instruction set of a `multiversion!` caller.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// Folds `x` into `LANES` independent accumulators with `step`, then combines them with
/// `merge`: a fixed order (the same bits on every CPU) that LLVM can vectorise, where a
/// plain `iter().sum()` is one serial chain of adds. Always inlined, as `dot`.
#[inline(always)]
pub fn fold_lanes(
    x: &[f32],
    init: f32,
    step: impl Fn(f32, f32) -> f32,
    merge: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut tail = init;
    for &v in chunks.remainder() {
        tail = step(tail, v);
    }
    for ch in chunks {
        for i in 0..LANES {
            acc[i] = step(acc[i], ch[i]);
        }
    }
    acc.into_iter().fold(tail, merge)
}

/// Sum of `x` in the lane order of [`fold_lanes`].
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    fold_lanes(x, 0.0, |a, v| a + v, |a, b| a + b)
}

/// Largest element of `x` (-inf when empty).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    fold_lanes(x, f32::NEG_INFINITY, f32::max, f32::max)
}

/// y += alpha * x
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// e^x for f32, relative error below 2e-7 over the range where the result is normal;
/// inputs are clamped to [-87.3, 88.3], so the result is always a normal float.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // x = n ln2 + r, |r| <= ln2 / 2
    // Round to nearest by the 1.5·2^23 trick, which also leaves n in the low mantissa bits
    // of `t`: 2^n is then integer arithmetic, with no float-to-int conversion or libm
    // `round` in the way of vectorisation.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // e^r by its Taylor polynomial to degree 7 (Horner)
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, e) = (exp(x), x.exp());
            assert!(((a - e) / e).abs() < 5e-7, "exp({x}) = {a}, std {e}");
            x += 0.0137;
        }
        assert!(exp(-200.0) < 2e-38 && exp(-200.0) >= 0.0);
    }

    #[test]
    fn tanh_matches_std() {
        let mut x = -12.0f32;
        while x < 12.0 {
            assert!((tanh(x) - x.tanh()).abs() < 3e-7, "tanh({x})");
            x += 0.001;
        }
    }

    #[test]
    fn lane_sum_and_max_match_naive_for_all_tail_lengths() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let naive: f64 = a.iter().map(|&x| x as f64).sum();
            assert!((sum(&a) as f64 - naive).abs() < 1e-5, "n={n}");
            assert_eq!(max(&a), a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)), "n={n}");
        }
    }

    #[test]
    fn dot_matches_naive_sum_for_all_tail_lengths() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5, "n={n}");
        }
    }
}
