// WKV-6 forward and backward with an initial state and its gradient: the device code.
//
// Per head, with S in the [value, key] layout, d_t = exp(-exp(w_t)) per key and u the bonus:
//     y_t = S_{t-1} r_t + v_t (k_t . (u * r_t)),    S_t = S_{t-1} diag(d_t) + v_t k_t^T.
// One thread block per (batch, head), N = 64 threads, the state in fp32 registers.
// Forward: thread i owns value row i of S and saves the state before every CHUNK-th step.
// Backward: thread e owns key column e of S and both row e and column e of G = dL/dS. RWKV-6 does not clamp
// its decay, so S_{t-1} cannot be rebuilt by dividing by d_t (which may be 0): for each chunk, walking
// backwards, the thread recomputes its column of the chunk's states from the checkpoint into a local history.
//
// Include wkv6.h (CUDA) or cpu_emulation.h first. No host code and no launch syntax here, so the CPU tests run
// this exact code through cpu_emulation.h, one host thread per CUDA thread.
#pragma once

#include "wkv_device.cuh"

namespace wkv6 {

constexpr int N = wkv::HEAD_SIZE;
constexpr int CHUNK = 16;  // steps between state checkpoints

__host__ __device__ constexpr int checkpoint_count(int T) { return (T + CHUNK - 1) / CHUNK; }

using wkv::dot;
using wkv::put;
using wkv::to_float;

// r, w, k, v, y: [B,T,H,N]; u: [H,N] fp32; s0, s_final: [B,H,N,N] value-major fp32.
// ckpt: [B,H,checkpoint_count(T),N,N] fp32, key-major: the state before steps 0, CHUNK, 2*CHUNK, ...
// (null when no backward pass follows).
template <typename F>
__global__ void __launch_bounds__(N, 1) forward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v,
    const float* __restrict__ u, const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ s_final,
    float* __restrict__ ckpt) {
    enum { R, KU, K, D, NVEC };
    __shared__ float vec[2][NVEC][N];  // double-buffered per-step vectors: one barrier per step

    const int bh = blockIdx.x, batch = bh / H, head = bh % H, i = threadIdx.x;
    const long long step = (long long)H * N;
    long long at = ((long long)batch * T * H + head) * N + i;
    const long long state_at = (long long)bh * N * N;
    float* ckpt_head = ckpt ? ckpt + state_at * checkpoint_count(T) : nullptr;
    const float u_i = u[head * N + i];

    float state[N];
#pragma unroll
    for (int j = 0; j < N; j++) state[j] = s0[state_at + i * N + j];

    for (int t = 0; t < T; t++, at += step) {
        float(*sv)[N] = vec[t & 1];
        const float r_i = to_float(r[at]), k_i = to_float(k[at]), v_i = to_float(v[at]);
        sv[R][i] = r_i;
        sv[K][i] = k_i;
        sv[KU][i] = k_i * u_i;
        sv[D][i] = expf(-expf(to_float(w[at])));
        if (ckpt_head && t % CHUNK == 0) {
            float* c = ckpt_head + (long long)(t / CHUNK) * N * N;
#pragma unroll
            for (int j = 0; j < N; j++) c[j * N + i] = state[j];
        }
        __syncthreads();

        put(y + at, dot(state, sv[R]) + v_i * dot(sv[KU], sv[R]));
#pragma unroll
        for (int j = 0; j < N; j++) state[j] = state[j] * sv[D][j] + v_i * sv[K][j];
    }
#pragma unroll
    for (int j = 0; j < N; j++) s_final[state_at + i * N + j] = state[j];
}

// dy: [B,T,H,N]; ds_final: [B,H,N,N] value-major. Writes dr, dw, dk, dv [B,T,H,N], du [B,H,N] fp32 (one
// partial sum per batch row; the caller sums over B) and ds0 [B,H,N,N] value-major fp32.
template <typename F>
__global__ void __launch_bounds__(N, 1) backward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v,
    const float* __restrict__ u, const F* __restrict__ dy, const float* __restrict__ ckpt,
    const float* __restrict__ ds_final,
    F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, float* __restrict__ du,
    float* __restrict__ ds0) {
    enum { R, KU, K, V, D, DY, NVEC };
    __shared__ float vec[2][NVEC][N];
    __shared__ float chunk_v[CHUNK][N];  // v of every step of the chunk being recomputed

    const int bh = blockIdx.x, batch = bh / H, head = bh % H, e = threadIdx.x;
    const long long step = (long long)H * N;
    const long long head_at = ((long long)batch * T * H + head) * N + e;
    const long long state_at = (long long)bh * N * N;
    const float* ckpt_head = ckpt + state_at * checkpoint_count(T);
    const float u_e = u[head * N + e];

    float g[N];   // g[j]  = G[e][j]: row e of G
    float gt[N];  // gt[i] = G[i][e]: column e of G
#pragma unroll
    for (int j = 0; j < N; j++) {
        g[j] = ds_final[state_at + e * N + j];
        gt[j] = ds_final[state_at + j * N + e];
    }
    float du_e = 0.f;
    float history[CHUNK][N];  // history[s][i] = S_{t-1}[i][e] for step t = start + s
    float k_own[CHUNK], d_own[CHUNK];

    for (int c = checkpoint_count(T) - 1; c >= 0; c--) {
        const int start = c * CHUNK, len = T - start < CHUNK ? T - start : CHUNK;
        __syncthreads();  // the previous chunk's readers of chunk_v are done
        for (int s = 0; s < len; s++) {
            const long long at = head_at + (long long)(start + s) * step;
            chunk_v[s][e] = to_float(v[at]);
            k_own[s] = to_float(k[at]);
            d_own[s] = expf(-expf(to_float(w[at])));
        }
        __syncthreads();
        float st[N];
        const float* saved = ckpt_head + (long long)c * N * N + e * N;
#pragma unroll
        for (int i = 0; i < N; i++) st[i] = saved[i];
        for (int s = 0; s < len; s++) {
#pragma unroll
            for (int i = 0; i < N; i++) {
                history[s][i] = st[i];
                st[i] = st[i] * d_own[s] + chunk_v[s][i] * k_own[s];
            }
        }

        for (int s = len - 1; s >= 0; s--) {
            const int t = start + s;
            const long long at = head_at + (long long)t * step;
            float(*sv)[N] = vec[t & 1];
            const float r_e = to_float(r[at]), k_e = k_own[s], v_e = chunk_v[s][e], d_e = d_own[s];
            const float dy_e = to_float(dy[at]);
            sv[R][e] = r_e;
            sv[K][e] = k_e;
            sv[KU][e] = k_e * u_e;
            sv[V][e] = v_e;
            sv[D][e] = d_e;
            sv[DY][e] = dy_e;
            __syncthreads();

            const float bonus = dot(sv[KU], sv[R]);  // k . (u * r)
            const float dy_v = dot(sv[DY], sv[V]);
            // G holds dL/dS_t: S_t = S_{t-1} diag(d) + v k^T
            const float dv_e = dot(g, sv[K]) + dy_e * bonus;
            const float dk_e = dot(gt, sv[V]) + dy_v * u_e * r_e;
            const float dd_e = dot(gt, history[s]);
            // y_t = S_{t-1} r + v (k . (u * r))
            const float dr_e = dot(history[s], sv[DY]) + dy_v * u_e * k_e;
            du_e += dy_v * k_e * r_e;
#pragma unroll
            for (int j = 0; j < N; j++) {
                g[j] = g[j] * sv[D][j] + dy_e * sv[R][j];
                gt[j] = gt[j] * d_e + sv[DY][j] * r_e;
            }  // G = dL/dS_{t-1}
            put(dr + at, dr_e);
            put(dw + at, -dd_e * d_e * expf(to_float(w[at])));  // d/dw exp(-exp(w)) = -exp(w) exp(-exp(w))
            put(dk + at, dk_e);
            put(dv + at, dv_e);
        }
    }
    du[(long long)bh * N + e] = du_e;
#pragma unroll
    for (int i = 0; i < N; i++) ds0[state_at + i * N + e] = gt[i];
}

}  // namespace wkv6
