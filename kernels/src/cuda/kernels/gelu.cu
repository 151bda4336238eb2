// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as GPT-2
// (mirrors cpu/gelu.rs). The _bf16 kernels take bf16 buffers and compute in f32.

#define GELU_S 0.7978845608f  // sqrt(2 / pi)
#define GELU_K 0.044715f

__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_S * (x + GELU_K * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float th = tanhf(GELU_S * (x + GELU_K * x * x * x));
    const float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_S * (1.0f + 3.0f * GELU_K * x * x);
}

// out (N) = gelu(inp). Written. `out` may alias `inp`.
// Launch: 1-D, one thread per element; block 256, grid ceil(N / 256).
extern "C" __global__ void gelu_forward(float* out, const float* inp, size_t N) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) out[i] = gelu(inp[i]);
}

// dinp (N) = gelu'(inp) * dout. Written, not accumulated (the Backend contract).
// Launch: as gelu_forward.
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout,
                                         size_t N) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) dinp[i] = gelu_grad(inp[i]) * dout[i];
}

// bf16 buffers, same contract and launch as gelu_forward; the math runs in f32.
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, size_t N) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) out[i] = f32_to_bf16(gelu(bf16_to_f32(inp[i])));
}

// bf16 buffers, same contract and launch as gelu_backward; the math runs in f32.
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout,
                                              size_t N) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N)
        dinp[i] = f32_to_bf16(gelu_grad(bf16_to_f32(inp[i])) * bf16_to_f32(dout[i]));
}
