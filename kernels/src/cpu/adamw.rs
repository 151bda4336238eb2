//! Fused AdamW with decoupled weight decay (Loshchilov & Hutter).

use rayon::prelude::*;

use crate::AdamW;

const CHUNK: usize = 1 << 14;

crate::math::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn update_chunk(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: &AdamW,
        bc1: f32,
        bc2: f32,
    ) {
        for i in 0..p.len() {
            let g = g[i] * hp.grad_scale;
            let mi = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
            let vi = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
            m[i] = mi;
            v[i] = vi;
            let mhat = mi / bc1;
            let vhat = vi / bc2;
            p[i] -= hp.lr * (mhat / (vhat.sqrt() + hp.eps) + hp.weight_decay * p[i]);
        }
    }
}

pub fn update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n);
    let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
    type Chunks<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);
    let go = |(((p, g), m), v): Chunks| update_chunk(p, g, m, v, hp, bc1, bc2);
    if n <= CHUNK {
        go((((params, grads), m), v));
    } else {
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(go);
    }
}
