// Launchers for the WKV-6 kernels behind the C API in wkv6.h. Builds on its own:
//     nvcc -O3 --use_fast_math -arch=sm_90 -c wkv6.cu
#include "wkv6.h"
#include "wkv6_kernels.cuh"

namespace {

template <typename F>
int launch_forward(int B, int T, int H, const F* r, const F* w, const F* k, const F* v, const float* u,
                   const float* s0, F* y, float* s_final, float* ckpt, cudaStream_t stream) {
    wkv6::forward_kernel<F><<<B * H, wkv6::N, 0, stream>>>(T, H, r, w, k, v, u, s0, y, s_final, ckpt);
    return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int B, int T, int H, const F* r, const F* w, const F* k, const F* v, const float* u,
                    const F* dy, const float* ckpt, const float* ds_final, F* dr, F* dw, F* dk, F* dv, float* du,
                    float* ds0, cudaStream_t stream) {
    wkv6::backward_kernel<F><<<B * H, wkv6::N, 0, stream>>>(T, H, r, w, k, v, u, dy, ckpt, ds_final, dr, dw, dk,
                                                           dv, du, ds0);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int wkv6_head_size(void) { return wkv6::N; }
int wkv6_checkpoint_count(int T) { return wkv6::checkpoint_count(T); }

int wkv6_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                      const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u, const float* s0,
                      __nv_bfloat16* y, float* s_final, float* ckpt, cudaStream_t stream) {
    return launch_forward(B, T, H, r, w, k, v, u, s0, y, s_final, ckpt, stream);
}

int wkv6_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                     const float* u, const float* s0, float* y, float* s_final, float* ckpt, cudaStream_t stream) {
    return launch_forward(B, T, H, r, w, k, v, u, s0, y, s_final, ckpt, stream);
}

int wkv6_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                       const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u, const __nv_bfloat16* dy,
                       const float* ckpt, const float* ds_final, __nv_bfloat16* dr, __nv_bfloat16* dw,
                       __nv_bfloat16* dk, __nv_bfloat16* dv, float* du, float* ds0, cudaStream_t stream) {
    return launch_backward(B, T, H, r, w, k, v, u, dy, ckpt, ds_final, dr, dw, dk, dv, du, ds0, stream);
}

int wkv6_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                      const float* u, const float* dy, const float* ckpt, const float* ds_final, float* dr,
                      float* dw, float* dk, float* dv, float* du, float* ds0, cudaStream_t stream) {
    return launch_backward(B, T, H, r, w, k, v, u, dy, ckpt, ds_final, dr, dw, dk, dv, du, ds0, stream);
}

}  // extern "C"
