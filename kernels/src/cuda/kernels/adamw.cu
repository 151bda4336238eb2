// Fused AdamW with decoupled weight decay (mirrors cpu/adamw.rs).

// One update of params (N) from grads (N), moments m and v (N) updated in place.
// bc1 = 1 - beta1^step and bc2 = 1 - beta2^step are computed on the host, in f32 as the
// CPU reference does, so both backends see the same bias corrections. grad_scale multiplies
// the gradient first (clipping, loss scaling); weight_decay is 0 for biases and LayerNorms.
// Launch: 1-D, one thread per element; block 256, grid ceil(N / 256).
extern "C" __global__ void adamw(float* params, const float* grads, float* m, float* v,
                                 size_t N, float lr, float beta1, float beta2, float eps,
                                 float weight_decay, float grad_scale, float bc1, float bc2) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    const float g = grads[i] * grad_scale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi / bc1;
    const float vhat = vi / bc2;
    const float p = params[i];
    params[i] = p - lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * p);
}
