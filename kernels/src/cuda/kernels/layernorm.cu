// LayerNorm over the last dimension, eps 1e-5, as GPT-2 (mirrors cpu/layernorm.rs).

#define LN_EPS 1e-5f

// out (N,C) = (inp - mean) * rstd * weight + bias, written; saves mean (N) and rstd (N).
// Launch: one warp per row; block 256 (8 rows), grid ceil(N / 8). Two passes over the row
// (mean, then variance about the mean), the second mostly from L1.
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd,
                                             const float* inp, const float* weight,
                                             const float* bias, int N, int C) {
    const int lane = threadIdx.x % FERRITE_WARP;
    const int row = blockIdx.x * (blockDim.x / FERRITE_WARP) + threadIdx.x / FERRITE_WARP;
    if (row >= N) return;  // whole warps leave together: no block-wide sync below
    const float* x = inp + (size_t)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += FERRITE_WARP) s += x[i];
    const float m = warp_sum(s) / C;
    float q = 0.0f;
    for (int i = lane; i < C; i += FERRITE_WARP) {
        const float d = x[i] - m;
        q += d * d;
    }
    const float r = rsqrtf(warp_sum(q) / C + LN_EPS);
    float* o = out + (size_t)row * C;
    for (int i = lane; i < C; i += FERRITE_WARP) o[i] = (x[i] - m) * r * weight[i] + bias[i];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// dinp (N,C) += the input gradient of each row. Accumulates: it lands on the residual
// stream, which already holds a gradient (the Backend contract).
// Launch: one warp per row; block 256 (8 rows), grid ceil(N / 8).
extern "C" __global__ void layernorm_backward_dinp(float* dinp, const float* dout,
                                                   const float* inp, const float* weight,
                                                   const float* mean, const float* rstd, int N,
                                                   int C) {
    const int lane = threadIdx.x % FERRITE_WARP;
    const int row = blockIdx.x * (blockDim.x / FERRITE_WARP) + threadIdx.x / FERRITE_WARP;
    if (row >= N) return;
    const size_t off = (size_t)row * C;
    const float m = mean[row], r = rstd[row];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int i = lane; i < C; i += FERRITE_WARP) {
        const float norm = (inp[off + i] - m) * r;
        const float dnorm = weight[i] * dout[off + i];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warp_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
    for (int i = lane; i < C; i += FERRITE_WARP) {
        const float norm = (inp[off + i] - m) * r;
        const float dnorm = weight[i] * dout[off + i];
        dinp[off + i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
    }
}

// dweight (C) += sum over rows of norm * dout; dbias (C) += sum over rows of dout.
// Deterministic, no atomics: a block owns 32 columns; its 32 x LN_ROWS threads each sum every
// LN_ROWS-th row of one column, then the row lanes are added in a fixed tree order.
// Launch: grid ceil(C / 32), block (32, LN_ROWS) = (32, 16).
#define LN_ROWS 16
extern "C" __global__ void layernorm_backward_params(float* dweight, float* dbias,
                                                     const float* dout, const float* inp,
                                                     const float* mean, const float* rstd,
                                                     int N, int C) {
    __shared__ float pw[LN_ROWS][FERRITE_WARP + 1];
    __shared__ float pb[LN_ROWS][FERRITE_WARP + 1];
    const int col = blockIdx.x * FERRITE_WARP + threadIdx.x;
    float aw = 0.0f, ab = 0.0f;
    if (col < C) {
        for (int r = threadIdx.y; r < N; r += LN_ROWS) {
            const size_t at = (size_t)r * C + col;
            const float g = dout[at];
            aw += (inp[at] - mean[r]) * rstd[r] * g;
            ab += g;
        }
    }
    pw[threadIdx.y][threadIdx.x] = aw;
    pb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    for (int s = LN_ROWS / 2; s > 0; s >>= 1) {
        if (threadIdx.y < s) {
            pw[threadIdx.y][threadIdx.x] += pw[threadIdx.y + s][threadIdx.x];
            pb[threadIdx.y][threadIdx.x] += pb[threadIdx.y + s][threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < C) {
        dweight[col] += pw[0][threadIdx.x];
        dbias[col] += pb[0][threadIdx.x];
    }
}
