// Sum of squares for the global gradient norm (mirrors Backend::sum_squares: accumulated in
// f64). Two launches, both in a fixed order, so the result is deterministic.
// Launch:
//   1. sum_squares_partial: grid G (the caller picks it once, e.g. 2 * SM count, and keeps it),
//      block 256 (a power of two, at most 1024). Block g writes partials[g].
//   2. sum_squares_final: grid 1, block 256 (power of two). out[0] = sum of partials[0..G).
// `partials` (G) and `out` (1) are f64 device buffers; the host downloads out[0].

#define GN_MAX_BLOCK 1024

__device__ __forceinline__ double block_sum_f64(double x) {
    __shared__ double scratch[GN_MAX_BLOCK / FERRITE_WARP];
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int warps = blockDim.x / FERRITE_WARP;
    x = warp_sum_f64(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    double total = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_f64(total);
}

extern "C" __global__ void sum_squares_partial(double* partials, const float* x, size_t N) {
    double acc = 0.0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride) {
        const double v = (double)x[i];
        acc += v * v;
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_final(double* out, const double* partials, int G) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) acc += partials[i];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = acc;
}
