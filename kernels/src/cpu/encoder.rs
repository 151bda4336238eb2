//! Token + learned position embedding.

use super::{for_rows, par_ranges, SendPtr};

/// out (b,t,c) = wte[tokens[b,t]] + wpe[t]
pub fn forward(
    out: &mut [f32],
    tokens: &[i32],
    wte: &[f32],
    wpe: &[f32],
    b: usize,
    t: usize,
    c: usize,
) {
    let out = &mut out[..b * t * c];
    for_rows(out, c, |bt, row| {
        let tok = tokens[bt] as usize;
        let pos = bt % t;
        let (e, p) = (&wte[tok * c..(tok + 1) * c], &wpe[pos * c..(pos + 1) * c]);
        for i in 0..c {
            row[i] = e[i] + p[i];
        }
    });
}

/// dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += dout[b,t].
///
/// Several positions can hold the same token, so the work is split by channel: each task
/// owns a range of columns and walks every position in order (deterministic, no atomics).
pub fn backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[i32],
    b: usize,
    t: usize,
    c: usize,
) {
    let (wte_ptr, wpe_ptr) = (SendPtr(dwte.as_mut_ptr()), SendPtr(dwpe.as_mut_ptr()));
    let (wte_len, wpe_len) = (dwte.len(), dwpe.len());
    par_ranges(c, rayon::current_num_threads(), 16, |r| {
        for bt in 0..b * t {
            let tok = tokens[bt] as usize;
            let pos = bt % t;
            let g = &dout[bt * c..(bt + 1) * c];
            assert!((tok + 1) * c <= wte_len && (pos + 1) * c <= wpe_len);
            for i in r.clone() {
                // SAFETY: in bounds (asserted above); column ranges are disjoint between tasks.
                unsafe {
                    *wte_ptr.get().add(tok * c + i) += g[i];
                    *wpe_ptr.get().add(pos * c + i) += g[i];
                }
            }
        }
    });
}
