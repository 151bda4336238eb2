//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr` (as nanoGPT).

/// Learning rate at 0-based step `step`.
pub fn lr_at(step: u64, lr: f32, min_lr: f32, warmup: u64, decay_steps: u64) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / (warmup + 1) as f32;
    }
    if step > decay_steps || decay_steps <= warmup {
        return min_lr;
    }
    let ratio = (step - warmup) as f64 / (decay_steps - warmup) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    (min_lr as f64 + coeff * (lr - min_lr) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warms_up_then_decays_to_min() {
        let f = |s| lr_at(s, 1e-3, 1e-4, 100, 2000);
        assert!((f(0) - 1e-3 / 101.0).abs() < 1e-9);
        assert!(f(50) < f(99));
        assert!((f(100) - 1e-3).abs() < 1e-9);
        assert!((f(1050) - 5.5e-4).abs() < 1e-6); // half way: the mean of lr and min_lr
        assert!((f(2000) - 1e-4).abs() < 1e-9);
        assert_eq!(f(5000), 1e-4);
    }
}
