// Helpers shared by every Ferrite kernel. NVRTC compiles each `.cu` on its own, with no
// system headers, so `nvrtc.rs` prepends this file to each source instead of #include-ing it
// (a `#line` directive after it keeps NVRTC's line numbers those of the `.cu` file).
//
// Conventions: f32 buffers, i32 token ids; dimensions are `int`, offsets are computed in
// `size_t` so that b*t*vp above 2^31 stays correct. Every reduction runs in a fixed order, so
// results never depend on timing (as the CPU backend promises).

#define FERRITE_NEG_INF (__int_as_float(0xff800000))
#define FERRITE_IGNORE_INDEX (-1)
#define FERRITE_WARP 32
#define FERRITE_FULL_MASK 0xffffffffu

// Sum over the 32 lanes of a warp; every lane gets the result (butterfly: fixed order).
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FERRITE_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ double warp_sum_f64(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FERRITE_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FERRITE_FULL_MASK, x, o));
    return x;
}

// Sum over a whole block of up to 1024 threads (blockDim.x a multiple of 32); every thread
// gets the result. `scratch` holds 32 floats of shared memory; the function synchronises
// before reading and after, so it may be called several times in a row with one scratch.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int warps = blockDim.x / FERRITE_WARP;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int warps = blockDim.x / FERRITE_WARP;
    x = warp_max(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float m = lane < warps ? scratch[lane] : FERRITE_NEG_INF;
    m = warp_max(m);
    __syncthreads();
    return m;
}

// bf16 as its raw 16 bits: NVRTC has no cuda_bf16.h without the toolkit's include folder, and
// the elementwise kernels only need the two conversions (the math runs in f32).
typedef unsigned short bf16;

__device__ __forceinline__ float bf16_to_f32(bf16 x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
