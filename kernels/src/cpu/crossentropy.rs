//! Fused softmax + cross-entropy over padded logits, with an ignore index.

use super::for_rows;
use super::softmax::softmax;
use crate::IGNORE_INDEX;

/// logits (n,vp) become probabilities in place; losses (n) = -ln p[target].
pub fn forward(
    losses: &mut [f32],
    logits: &mut [f32],
    targets: &[i32],
    n: usize,
    v: usize,
    vp: usize,
) {
    assert!(losses.len() >= n && targets.len() >= n && logits.len() >= n * vp);
    let lp = super::SendPtr(losses.as_mut_ptr());
    for_rows(&mut logits[..n * vp], vp, |i, row| {
        let (z, pad) = row.split_at_mut(v);
        let tgt = targets[i];
        // -ln p[target] = lse - logit[target]: finite even where p underflows.
        let z_tgt = if tgt == IGNORE_INDEX { 0.0 } else { z[tgt as usize] };
        let lse = softmax(z);
        pad.fill(0.0);
        let loss = if tgt == IGNORE_INDEX { 0.0 } else { lse - z_tgt };
        // SAFETY: i < n (asserted), one task per row.
        unsafe { *lp.get().add(i) = loss };
    });
}

/// probs (n,vp) become dlogits in place.
pub fn backward(probs: &mut [f32], targets: &[i32], dloss: f32, n: usize, v: usize, vp: usize) {
    assert!(targets.len() >= n && probs.len() >= n * vp);
    for_rows(&mut probs[..n * vp], vp, |i, row| {
        let tgt = targets[i];
        if tgt == IGNORE_INDEX {
            row.fill(0.0);
            return;
        }
        for x in row[..v].iter_mut() {
            *x *= dloss;
        }
        row[tgt as usize] -= dloss;
        row[v..].fill(0.0);
    });
}
