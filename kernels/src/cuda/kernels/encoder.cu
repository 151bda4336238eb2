// Token + learned position embedding (mirrors cpu/encoder.rs).

// out (B,T,C) = wte[tokens[b,t]] + wpe[t]. Written, not accumulated.
// Launch: 1-D, one thread per element of out; block 256, grid ceil(B*T*C / 256).
// Expects every token in [0, vocab): wte has a row for each.
extern "C" __global__ void encoder_forward(float* out, const int* tokens, const float* wte,
                                           const float* wpe, int B, int T, int C) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)B * T * C;
    if (idx >= total) return;
    const size_t bt = idx / C;
    const int i = (int)(idx % C);
    const size_t tok = (size_t)tokens[bt];
    const size_t pos = bt % T;
    out[idx] = wte[tok * C + i] + wpe[pos * C + i];
}

// dwpe[t] += sum over b of dout[b,t], b ascending (the order of the CPU reference, so the
// result is bit-identical to it).
// Launch: 1-D, one thread per element of dwpe[0..T]; block 256, grid ceil(T*C / 256).
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const float* dout, int B, int T,
                                                int C) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * C) return;
    float acc = dwpe[idx];
    for (int b = 0; b < B; b++) acc += dout[(size_t)b * T * C + idx];
    dwpe[idx] = acc;
}

// dwte[tokens[b,t]] += dout[b,t], without atomics: the host buckets the positions by token
// (it holds the tokens it uploaded). `order` (B*T) lists positions grouped by token and, within
// a token, ascending; bucket k covers order[starts[k] .. starts[k+1]) and `starts` has
// n_buckets + 1 entries. Each bucket's row of dwte is summed in position order, as the CPU
// reference does, so the result is bit-identical to it.
// Launch: 2-D, grid (n_buckets, ceil(C / 256)), block 256: blockIdx.x picks the bucket,
// each thread owns one channel.
extern "C" __global__ void encoder_backward_wte(float* dwte, const float* dout,
                                                const int* tokens, const int* order,
                                                const int* starts, int n_buckets, int C) {
    const int k = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (k >= n_buckets || i >= C) return;
    const int first = starts[k], last = starts[k + 1];
    const size_t tok = (size_t)tokens[order[first]];
    float acc = dwte[tok * C + i];
    for (int j = first; j < last; j++) acc += dout[(size_t)order[j] * C + i];
    dwte[tok * C + i] = acc;
}
