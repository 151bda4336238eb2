// Causal multi-head self-attention, flash style (mirrors cpu/attention.rs): qkv (B,T,3C) is
// laid out [q | k | v] per position, head h owns channels h*hs .. (h+1)*hs of each part,
// hs = C / NH, scores are scaled by 1/sqrt(hs). Forward keeps a running max and sum per query
// row while it walks tiles of keys (online softmax), so scores never reach global memory, and
// saves only each row's log-sum-exp; backward recomputes the probabilities from it.
//
// Expects hs <= ATT_HS_MAX (the host checks) and C % NH == 0. Tiles live in static shared
// memory sized for ATT_HS_MAX (about 41 KB per block, under the 48 KB static limit). Rows of
// a tile that are read across lanes (lane = key or query) are padded by one float, so 32 lanes
// reading one column hit 32 different banks.
//
// Determinism: every sum runs in a fixed order and no kernel uses atomics; dq, dk and dv are
// each written by exactly one warp.

#define ATT_HS_MAX 128
#define ATT_DPL (ATT_HS_MAX / FERRITE_WARP)  // head channels per lane
#define ATT_WARPS 8                           // blocks of 256 threads
#define ATT_BC 32                             // keys per tile in forward and dq: one per lane
#define ATT_FWD_BR 16                         // query rows per forward block: 2 per warp
#define ATT_DQ_BR 8                           // query rows per dq block: 1 per warp
#define ATT_KV_BK 8                           // keys per dk/dv block: 1 per warp
#define ATT_KV_BQ 32                          // query rows per dk/dv tile: one per lane

// Loads rows [r0, r0 + rows) of one part (0 q, 1 k, 2 v) of head h into a shared tile with row
// stride `ld`; rows at or past T are zero. All threads of the block take part.
__device__ __forceinline__ void att_load(float* tile, int ld, const float* qkv, int b, int h,
                                         int part, int r0, int rows, int T, int C, int hs) {
    for (int idx = threadIdx.x; idx < rows * hs; idx += blockDim.x) {
        const int r = idx / hs, d = idx % hs, t = r0 + r;
        tile[r * ld + d] =
            t < T ? qkv[((size_t)b * T + t) * 3 * C + (size_t)part * C + h * hs + d] : 0.0f;
    }
}

// Same for a (B,T,C) tensor such as dout.
__device__ __forceinline__ void att_load_btc(float* tile, int ld, const float* x, int b, int h,
                                             int r0, int rows, int T, int C, int hs) {
    for (int idx = threadIdx.x; idx < rows * hs; idx += blockDim.x) {
        const int r = idx / hs, d = idx % hs, t = r0 + r;
        tile[r * ld + d] = t < T ? x[((size_t)b * T + t) * C + h * hs + d] : 0.0f;
    }
}

__device__ __forceinline__ float att_dot(const float* a, const float* b, int hs) {
    float s = 0.0f;
#pragma unroll 8
    for (int d = 0; d < hs; d++) s += a[d] * b[d];
    return s;
}

// out (B,T,C) and lse (B,NH,T), both written, from qkv (B,T,3C).
// Launch: grid (ceil(T / ATT_FWD_BR), B*NH), block 256 (ATT_WARPS warps). Block (x, bh) owns
// query rows x*16 .. x*16+15 of head bh % NH of batch bh / NH; warp w owns rows 2w and 2w+1
// of that tile; in each key tile lane l scores key j0 + l and owns head channels l, l+32, ...
extern "C" __global__ void attention_forward(float* out, float* lse, const float* qkv, int B,
                                             int T, int C, int NH) {
    __shared__ float sQ[ATT_FWD_BR][ATT_HS_MAX];
    __shared__ float sK[ATT_BC][ATT_HS_MAX + 1];
    __shared__ float sV[ATT_BC][ATT_HS_MAX];
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int hs = C / NH;
    const float scale = 1.0f / sqrtf((float)hs);
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int i0 = blockIdx.x * ATT_FWD_BR;
    const int rows_per_warp = ATT_FWD_BR / ATT_WARPS;

    att_load(&sQ[0][0], ATT_HS_MAX, qkv, b, h, 0, i0, ATT_FWD_BR, T, C, hs);
    float m[ATT_FWD_BR / ATT_WARPS], l[ATT_FWD_BR / ATT_WARPS];
    float o[ATT_FWD_BR / ATT_WARPS][ATT_DPL];
    for (int rr = 0; rr < rows_per_warp; rr++) {
        m[rr] = FERRITE_NEG_INF;
        l[rr] = 0.0f;
        for (int k = 0; k < ATT_DPL; k++) o[rr][k] = 0.0f;
    }
    const int keys = min(i0 + ATT_FWD_BR, T);  // the last row of the tile sees keys < this
    for (int j0 = 0; j0 < keys; j0 += ATT_BC) {
        __syncthreads();  // the previous tile is no longer read
        att_load(&sK[0][0], ATT_HS_MAX + 1, qkv, b, h, 1, j0, ATT_BC, T, C, hs);
        att_load(&sV[0][0], ATT_HS_MAX, qkv, b, h, 2, j0, ATT_BC, T, C, hs);
        __syncthreads();
        for (int rr = 0; rr < rows_per_warp; rr++) {
            const int r = warp * rows_per_warp + rr, i = i0 + r;
            if (i >= T || j0 > i) continue;  // uniform over the warp
            const int j = j0 + lane;
            float s = att_dot(sQ[r], sK[lane], hs) * scale;
            if (j > i) s = FERRITE_NEG_INF;
            const float m_new = fmaxf(m[rr], warp_max(s));  // finite: key j0 <= i is visible
            const float p = j <= i ? expf(s - m_new) : 0.0f;
            const float alpha = expf(m[rr] - m_new);  // 0 on the first tile (m = -inf)
            l[rr] = l[rr] * alpha + warp_sum(p);
            m[rr] = m_new;
            for (int k = 0; k < ATT_DPL; k++) o[rr][k] *= alpha;
            const int visible = min(ATT_BC, i - j0 + 1);
            for (int jj = 0; jj < visible; jj++) {
                const float pj = __shfl_sync(FERRITE_FULL_MASK, p, jj);
                for (int k = 0; k < ATT_DPL; k++) {
                    const int d = lane + k * FERRITE_WARP;
                    if (d < hs) o[rr][k] += pj * sV[jj][d];
                }
            }
        }
    }
    for (int rr = 0; rr < rows_per_warp; rr++) {
        const int i = i0 + warp * rows_per_warp + rr;
        if (i >= T) continue;
        const float inv = 1.0f / l[rr];
        float* orow = out + ((size_t)b * T + i) * C + h * hs;
        for (int k = 0; k < ATT_DPL; k++) {
            const int d = lane + k * FERRITE_WARP;
            if (d < hs) orow[d] = o[rr][k] * inv;
        }
        if (lane == 0) lse[(size_t)bh * T + i] = m[rr] + logf(l[rr]);
    }
}

// Backward, part 1: the q third of dqkv (B,T,3C), written. With P = exp(S - lse),
// dP = dout . v, D = rowsum(dout * out) and dS = P (dP - D) scale: dq_i = sum_j dS_ij k_j.
// Launch: grid (ceil(T / ATT_DQ_BR), B*NH), block 256. Warp w owns query row x*8 + w; in
// each key tile lane l handles key j0 + l and owns head channels l, l+32, ...
extern "C" __global__ void attention_backward_dq(float* dqkv, const float* dout,
                                                 const float* qkv, const float* out,
                                                 const float* lse, int B, int T, int C,
                                                 int NH) {
    __shared__ float sQ[ATT_DQ_BR][ATT_HS_MAX];
    __shared__ float sdO[ATT_DQ_BR][ATT_HS_MAX];
    __shared__ float sK[ATT_BC][ATT_HS_MAX + 1];
    __shared__ float sV[ATT_BC][ATT_HS_MAX + 1];
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int hs = C / NH;
    const float scale = 1.0f / sqrtf((float)hs);
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int i0 = blockIdx.x * ATT_DQ_BR, i = i0 + warp;

    att_load(&sQ[0][0], ATT_HS_MAX, qkv, b, h, 0, i0, ATT_DQ_BR, T, C, hs);
    att_load_btc(&sdO[0][0], ATT_HS_MAX, dout, b, h, i0, ATT_DQ_BR, T, C, hs);
    float D = 0.0f, L = 0.0f;
    if (i < T) {
        const size_t at = ((size_t)b * T + i) * C + h * hs;
        float s = 0.0f;
        for (int d = lane; d < hs; d += FERRITE_WARP) s += dout[at + d] * out[at + d];
        D = warp_sum(s);
        L = lse[(size_t)bh * T + i];
    }
    float dq[ATT_DPL];
    for (int k = 0; k < ATT_DPL; k++) dq[k] = 0.0f;
    const int keys = min(i0 + ATT_DQ_BR, T);
    for (int j0 = 0; j0 < keys; j0 += ATT_BC) {
        __syncthreads();
        att_load(&sK[0][0], ATT_HS_MAX + 1, qkv, b, h, 1, j0, ATT_BC, T, C, hs);
        att_load(&sV[0][0], ATT_HS_MAX + 1, qkv, b, h, 2, j0, ATT_BC, T, C, hs);
        __syncthreads();
        if (i >= T || j0 > i) continue;  // uniform over the warp; no sync skipped
        const int j = j0 + lane;
        const float s = att_dot(sQ[warp], sK[lane], hs) * scale;
        const float p = j <= i ? expf(s - L) : 0.0f;
        const float dp = att_dot(sdO[warp], sV[lane], hs);
        const float ds = p * (dp - D) * scale;
        const int visible = min(ATT_BC, i - j0 + 1);
        for (int jj = 0; jj < visible; jj++) {
            const float dsj = __shfl_sync(FERRITE_FULL_MASK, ds, jj);
            for (int k = 0; k < ATT_DPL; k++) {
                const int d = lane + k * FERRITE_WARP;
                if (d < hs) dq[k] += dsj * sK[jj][d];
            }
        }
    }
    if (i < T) {
        float* row = dqkv + ((size_t)b * T + i) * 3 * C + h * hs;
        for (int k = 0; k < ATT_DPL; k++) {
            const int d = lane + k * FERRITE_WARP;
            if (d < hs) row[d] = dq[k];
        }
    }
}

// Backward, part 2: the k and v thirds of dqkv (B,T,3C), written:
// dk_j = sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} P_ij dout_i.
// Launch: grid (ceil(T / ATT_KV_BK), B*NH), block 256. Warp w owns key j = x*8 + w and walks
// tiles of 32 query rows from the tile holding j to T; lane l handles query i0 + l and owns
// head channels l, l+32, ...
extern "C" __global__ void attention_backward_dkv(float* dqkv, const float* dout,
                                                  const float* qkv, const float* out,
                                                  const float* lse, int B, int T, int C,
                                                  int NH) {
    __shared__ float sQ[ATT_KV_BQ][ATT_HS_MAX + 1];
    __shared__ float sdO[ATT_KV_BQ][ATT_HS_MAX + 1];
    __shared__ float sK[ATT_KV_BK][ATT_HS_MAX];
    __shared__ float sV[ATT_KV_BK][ATT_HS_MAX];
    __shared__ float sL[ATT_KV_BQ], sD[ATT_KV_BQ];
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int hs = C / NH;
    const float scale = 1.0f / sqrtf((float)hs);
    const int lane = threadIdx.x % FERRITE_WARP, warp = threadIdx.x / FERRITE_WARP;
    const int j0 = blockIdx.x * ATT_KV_BK, j = j0 + warp;

    att_load(&sK[0][0], ATT_HS_MAX, qkv, b, h, 1, j0, ATT_KV_BK, T, C, hs);
    att_load(&sV[0][0], ATT_HS_MAX, qkv, b, h, 2, j0, ATT_KV_BK, T, C, hs);
    float dk[ATT_DPL], dv[ATT_DPL];
    for (int k = 0; k < ATT_DPL; k++) dk[k] = dv[k] = 0.0f;
    // ATT_KV_BK divides ATT_KV_BQ, so all keys of the block share their first query tile.
    for (int i0 = j0 / ATT_KV_BQ * ATT_KV_BQ; i0 < T; i0 += ATT_KV_BQ) {
        __syncthreads();
        att_load(&sQ[0][0], ATT_HS_MAX + 1, qkv, b, h, 0, i0, ATT_KV_BQ, T, C, hs);
        att_load_btc(&sdO[0][0], ATT_HS_MAX + 1, dout, b, h, i0, ATT_KV_BQ, T, C, hs);
        // D and lse of the tile's rows: warp w computes rows w, w+8, ...
        for (int r = warp; r < ATT_KV_BQ; r += ATT_WARPS) {
            const int i = i0 + r;
            float s = 0.0f;
            if (i < T) {
                const size_t at = ((size_t)b * T + i) * C + h * hs;
                for (int d = lane; d < hs; d += FERRITE_WARP) s += dout[at + d] * out[at + d];
            }
            s = warp_sum(s);
            if (lane == 0) {
                sD[r] = s;
                sL[r] = i < T ? lse[(size_t)bh * T + i] : 0.0f;
            }
        }
        __syncthreads();
        if (j >= T) continue;  // uniform over the warp; no sync skipped
        const int i = i0 + lane;
        const bool valid = i < T && i >= j;
        const float s = att_dot(sQ[lane], sK[warp], hs) * scale;
        const float p = valid ? expf(s - sL[lane]) : 0.0f;
        const float dp = att_dot(sdO[lane], sV[warp], hs);
        const float ds = p * (dp - sD[lane]) * scale;
        for (int ii = 0; ii < ATT_KV_BQ; ii++) {
            const float pi = __shfl_sync(FERRITE_FULL_MASK, p, ii);
            const float dsi = __shfl_sync(FERRITE_FULL_MASK, ds, ii);
            for (int k = 0; k < ATT_DPL; k++) {
                const int d = lane + k * FERRITE_WARP;
                if (d < hs) {
                    dv[k] += pi * sdO[ii][d];
                    dk[k] += dsi * sQ[ii][d];
                }
            }
        }
    }
    if (j < T) {
        float* row = dqkv + ((size_t)b * T + j) * 3 * C + h * hs;
        for (int k = 0; k < ATT_DPL; k++) {
            const int d = lane + k * FERRITE_WARP;
            if (d < hs) {
                row[C + d] = dk[k];
                row[2 * C + d] = dv[k];
            }
        }
    }
}
