//! GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

use rayon::prelude::*;

use crate::math;

const S: f32 = 0.797_884_6; // sqrt(2 / pi)
const K: f32 = 0.044_715;
const CHUNK: usize = 1 << 14;

math::multiversion! {
    fn forward_chunk(o: &mut [f32], x: &[f32]) {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = 0.5 * x * (1.0 + math::tanh(S * (x + K * x * x * x)));
        }
    }
}

math::multiversion! {
    fn backward_chunk(d: &mut [f32], x: &[f32], g: &[f32]) {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            let u = S * (x + K * x * x * x);
            let th = math::tanh(u);
            let sech2 = 1.0 - th * th;
            let local = 0.5 * (1.0 + th) + 0.5 * x * sech2 * S * (1.0 + 3.0 * K * x * x);
            *d = local * g;
        }
    }
}

pub fn forward(out: &mut [f32], inp: &[f32]) {
    let go = |(o, x): (&mut [f32], &[f32])| forward_chunk(o, x);
    if out.len() <= CHUNK {
        go((out, inp));
    } else {
        out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(go);
    }
}

/// dinp = gelu'(inp) * dout
pub fn backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let go = |((d, x), g): ((&mut [f32], &[f32]), &[f32])| backward_chunk(d, x, g);
    if dinp.len() <= CHUNK {
        go(((dinp, inp), dout));
    } else {
        dinp.par_chunks_mut(CHUNK)
            .zip(inp.par_chunks(CHUNK))
            .zip(dout.par_chunks(CHUNK))
            .for_each(go);
    }
}
