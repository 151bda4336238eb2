// Fused softmax + cross-entropy over padded logits, with ignore index -1 (mirrors
// cpu/crossentropy.rs).

// logits (N,Vp) become probabilities in place: columns < V get softmax, columns >= V (the
// padding) become 0. losses (N) = -log p[target], written; 0 where target == -1. A target
// outside [0, V) other than -1 is a caller bug: its loss is NaN, so it cannot pass unseen.
// Launch: one block per row; grid N, block CE_BLOCK (256, a multiple of 32).
#define CE_BLOCK 256
extern "C" __global__ void crossentropy_forward(float* losses, float* logits,
                                                const int* targets, int N, int V, int Vp) {
    __shared__ float scratch[FERRITE_WARP];
    const int row = blockIdx.x;
    if (row >= N) return;  // uniform over the block
    float* z = logits + (size_t)row * Vp;
    const int tgt = targets[row];
    // Read before any thread overwrites the row (block_max synchronises first).
    const float zt = (tgt >= 0 && tgt < V) ? z[tgt] : 0.0f;
    float m = FERRITE_NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, z[j]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(z[j] - m);
    s = block_sum(s, scratch);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < Vp; j += blockDim.x) z[j] = j < V ? expf(z[j] - m) * inv : 0.0f;
    if (threadIdx.x == 0) {
        float loss;
        if (tgt == FERRITE_IGNORE_INDEX) loss = 0.0f;
        else if (tgt < 0 || tgt >= V) loss = __int_as_float(0x7fc00000);  // NaN
        else loss = logf(s) - (zt - m);  // log-softmax from the sum: finite when p underflows
        losses[row] = loss;
    }
}

// probs (N,Vp), as left by forward, become dlogits in place: (p - onehot(target)) * dloss;
// 0 on rows whose target is -1 and on padded columns. Written.
// Launch: 1-D, one thread per element of probs; block 256, grid ceil(N*Vp / 256).
extern "C" __global__ void crossentropy_backward(float* probs, const int* targets, float dloss,
                                                 int N, int V, int Vp) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * Vp) return;
    const int row = (int)(idx / Vp), j = (int)(idx % Vp);
    const int tgt = targets[row];
    if (tgt == FERRITE_IGNORE_INDEX || j >= V) {
        probs[idx] = 0.0f;
        return;
    }
    const float g = probs[idx] * dloss;
    probs[idx] = j == tgt ? g - dloss : g;
}
