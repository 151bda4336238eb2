// Bias helpers for the linear layers, whose products go to cuBLAS (mirrors the bias parts of
// cpu/matmul.rs).

// out (N,OC): every row = bias (OC). Written. The forward then runs the GEMM with beta = 1,
// so out = bias + inp @ w, in the order of the CPU reference.
// Launch: 1-D, one thread per element of out; block 256, grid ceil(N*OC / 256).
extern "C" __global__ void bias_broadcast(float* out, const float* bias, int N, int OC) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (size_t)N * OC) out[idx] = bias[idx % OC];
}

// dbias (OC) += column sums of dout (N,OC). Deterministic, no atomics: a block owns 32
// columns; its 32 x BIAS_ROWS threads each sum every BIAS_ROWS-th row of one column, then the
// row lanes are added in a fixed tree order in shared memory.
// Launch: grid ceil(OC / 32), block (32, BIAS_ROWS) = (32, 32).
#define BIAS_ROWS 32
extern "C" __global__ void bias_backward(float* dbias, const float* dout, int N, int OC) {
    __shared__ float part[BIAS_ROWS][FERRITE_WARP + 1];
    const int col = blockIdx.x * FERRITE_WARP + threadIdx.x;
    float acc = 0.0f;
    if (col < OC)
        for (int r = threadIdx.y; r < N; r += BIAS_ROWS) acc += dout[(size_t)r * OC + col];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    for (int s = BIAS_ROWS / 2; s > 0; s >>= 1) {
        if (threadIdx.y < s) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + s][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < OC) dbias[col] += part[0][threadIdx.x];
}
