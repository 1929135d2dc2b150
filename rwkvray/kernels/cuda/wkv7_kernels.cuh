// WKV-7 forward and backward with an initial state: the device code.
//
// Per head, with S in the [value, key] layout and d_t = exp(-exp(w_t)):
//     S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t.
// One thread block per (batch, head), N = 64 threads, the state in fp32 registers.
// Forward: thread i owns value row i of S. It keeps sa_t = S_{t-1} a_t for the backward pass and a copy of
// the state after every CHUNK-th step (and after the last step).
// Backward: thread e owns key column e of S and of G = dL/dS. It walks t downwards, reloads S at checkpoints
// and in between steps it back: S_{t-1} = (S_t - v k^T - sa b^T) diag(1/d_t). The two products that need
// row e of G (G k and G b) read it from a copy of G in shared memory, written column by column each step:
// holding G once keeps the thread under 255 registers without spills (rows and columns took 3 x 64).
// That division is safe because the model clamps w <= -0.5, so d_t >= exp(-exp(-0.5)) > 0.545.
//
// Include wkv7.h (CUDA) or cpu_emulation.h first. This header has no host code and no launch syntax, so it
// also compiles as plain C++ under cpu_emulation.h: the CPU tests run this exact code, one host thread per
// CUDA thread.
#pragma once

#include "wkv_device.cuh"

namespace wkv7 {

constexpr int N = wkv::HEAD_SIZE;
constexpr int CHUNK = 16;  // steps between state checkpoints

__host__ __device__ constexpr int checkpoint_count(int T) { return (T + CHUNK - 1) / CHUNK; }

using wkv::dot;
using wkv::put;
using wkv::to_float;

__device__ __forceinline__ bool is_checkpoint_step(int t, int T) { return (t + 1) % CHUNK == 0 || t == T - 1; }


// Inputs r, w, k, v, a, b, y: [B,T,H,N]. s0, s_final: [B,H,N,N] value-major.
// sa: [B,T,H,N] fp32; ckpt: [B,H,checkpoint_count(T),N,N] fp32, key-major (coalesced writes here).
// sa and ckpt may be null when no backward pass follows.
template <typename F>
__global__ void __launch_bounds__(N, 1) forward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ s_final,
    float* __restrict__ sa_out, float* __restrict__ ckpt) {
    enum { R, K, A, B, D, NVEC };
    __shared__ float vec[2][NVEC][N];  // double-buffered per-step vectors: one barrier per step

    const int bh = blockIdx.x, batch = bh / H, head = bh % H, i = threadIdx.x;
    const long long step = (long long)H * N;
    long long at = ((long long)batch * T * H + head) * N + i;
    const long long state_at = (long long)bh * N * N;
    float* ckpt_head = ckpt ? ckpt + state_at * checkpoint_count(T) : nullptr;

    float state[N];
#pragma unroll
    for (int j = 0; j < N; j++) state[j] = s0[state_at + i * N + j];

    // Loads for step t+1 are issued during step t, so their latency hides behind the arithmetic.
    float nr = to_float(r[at]), nw = to_float(w[at]), nk = to_float(k[at]);
    float nv = to_float(v[at]), na = to_float(a[at]), nb = to_float(b[at]);
    for (int t = 0; t < T; t++, at += step) {
        float(*sv)[N] = vec[t & 1];
        sv[R][i] = nr;
        sv[K][i] = nk;
        sv[A][i] = na;
        sv[B][i] = nb;
        sv[D][i] = expf(-expf(nw));
        const float vi = nv;
        __syncthreads();
        if (t + 1 < T) {
            nr = to_float(r[at + step]), nw = to_float(w[at + step]), nk = to_float(k[at + step]);
            nv = to_float(v[at + step]), na = to_float(a[at + step]), nb = to_float(b[at + step]);
        }

        const float sa = dot(state, sv[A]);
#pragma unroll
        for (int j = 0; j < N; j++) state[j] = state[j] * sv[D][j] + (sa * sv[B][j] + vi * sv[K][j]);
        put(y + at, dot(state, sv[R]));

        if (sa_out) sa_out[at] = sa;
        if (ckpt_head && is_checkpoint_step(t, T)) {
            float* c = ckpt_head + (long long)(t / CHUNK) * N * N;
#pragma unroll
            for (int j = 0; j < N; j++) c[j * N + i] = state[j];
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) s_final[state_at + i * N + j] = state[j];
}

// dy: [B,T,H,N]; ds_final: [B,H,N,N] value-major (the gradient of the final state);
// sa and ckpt as written by forward_kernel. Writes dr..db [B,T,H,N] and ds0 [B,H,N,N] value-major.
template <typename F>
__global__ void __launch_bounds__(N, 1) backward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const F* __restrict__ dy, const float* __restrict__ sa, const float* __restrict__ ckpt,
    const float* __restrict__ ds_final,
    F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk,
    F* __restrict__ dv, F* __restrict__ da, F* __restrict__ db, float* __restrict__ ds0) {
    enum { R, K, V, A, B, D, DY, SA, NVEC };
    __shared__ float vec[2][NVEC][N];
    __shared__ float state_b[2][N];      // (dL/dS_t) b_t, one entry per value row
    __shared__ float g_shared[N][N + 1];  // G[i][j] at [i][j]; the padding keeps rows and columns conflict-free

    const int bh = blockIdx.x, batch = bh / H, head = bh % H, e = threadIdx.x;
    const long long step = (long long)H * N;
    long long at = ((long long)batch * T * H + head) * N + e + (long long)(T - 1) * step;
    const long long state_at = (long long)bh * N * N;
    const float* ckpt_head = ckpt + state_at * checkpoint_count(T);

    float st[N];  // st[i] = S[i][e]: column e of the state after the current step
    float gt[N];  // gt[i] = G[i][e]: column e of G = dL/dS
#pragma unroll
    for (int i = 0; i < N; i++) gt[i] = ds_final[state_at + i * N + e];

    float nr = to_float(r[at]), nw = to_float(w[at]), nk = to_float(k[at]), nv = to_float(v[at]);
    float na = to_float(a[at]), nb = to_float(b[at]), ndy = to_float(dy[at]), nsa = sa[at];
    for (int t = T - 1; t >= 0; t--, at -= step) {
        float(*sv)[N] = vec[t & 1];
        float* sb = state_b[t & 1];
        const float r_e = nr, k_e = nk, a_e = na, b_e = nb;
        const float exp_w = expf(nw), d_e = expf(-exp_w);
        sv[R][e] = nr;
        sv[K][e] = nk;
        sv[V][e] = nv;
        sv[A][e] = na;
        sv[B][e] = nb;
        sv[D][e] = d_e;
        sv[DY][e] = ndy;
        sv[SA][e] = nsa;
        if (is_checkpoint_step(t, T)) {
            const float* c = ckpt_head + (long long)(t / CHUNK) * N * N + e * N;
#pragma unroll
            for (int i = 0; i < N; i++) st[i] = c[i];
        }
        __syncthreads();
        if (t > 0) {
            nr = to_float(r[at - step]), nw = to_float(w[at - step]), nk = to_float(k[at - step]);
            nv = to_float(v[at - step]), na = to_float(a[at - step]), nb = to_float(b[at - step]);
            ndy = to_float(dy[at - step]), nsa = sa[at - step];
        }

        // y_t = S_t r_t
        const float dr_e = dot(st, sv[DY]);
#pragma unroll
        for (int i = 0; i < N; i++) {
            gt[i] += sv[DY][i] * r_e;
            g_shared[i][e] = gt[i];
        }
        __syncthreads();
        // S_t = S_{t-1} (diag(d) + a b^T) + v k^T; G now holds dL/dS_t, and row e of it is in g_shared[e]
        const float dv_e = dot(g_shared[e], sv[K]);
        const float gb_e = dot(g_shared[e], sv[B]);
        sb[e] = gb_e;
        const float dk_e = dot(gt, sv[V]);
        const float inv_d = 1.f / d_e;
#pragma unroll
        for (int i = 0; i < N; i++) st[i] = (st[i] - sv[V][i] * k_e - sv[SA][i] * b_e) * inv_d;  // S_{t-1}
        const float dd_e = dot(st, gt);
        const float db_e = dot(gt, sv[SA]);
        __syncthreads();
        const float da_e = dot(st, sb);
#pragma unroll
        for (int i = 0; i < N; i++) gt[i] = gt[i] * d_e + sb[i] * a_e;  // G = dL/dS_{t-1}

        put(dr + at, dr_e);
        put(dw + at, -dd_e * d_e * exp_w);  // d/dw exp(-exp(w)) = -exp(w) exp(-exp(w))
        put(dk + at, dk_e);
        put(dv + at, dv_e);
        put(da + at, da_e);
        put(db + at, db_e);
    }
#pragma unroll
    for (int i = 0; i < N; i++) ds0[state_at + i * N + e] = gt[i];
}

}  // namespace wkv7
