// Launchers for the WKV-7 kernels behind the C API in wkv7.h. Builds on its own:
//     nvcc -O3 --use_fast_math -arch=sm_90 -c wkv7.cu
#include "wkv7.h"
#include "wkv7_kernels.cuh"

namespace {

template <typename F>
int launch_forward(int B, int T, int H, const F* r, const F* w, const F* k, const F* v, const F* a, const F* b,
                   const float* s0, F* y, float* s_final, float* sa, float* ckpt, cudaStream_t stream) {
    wkv7::forward_kernel<F><<<B * H, wkv7::N, 0, stream>>>(T, H, r, w, k, v, a, b, s0, y, s_final, sa, ckpt);
    return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int B, int T, int H, const F* r, const F* w, const F* k, const F* v, const F* a, const F* b,
                    const F* dy, const float* sa, const float* ckpt, const float* ds_final, F* dr, F* dw, F* dk,
                    F* dv, F* da, F* db, float* ds0, cudaStream_t stream) {
    wkv7::backward_kernel<F><<<B * H, wkv7::N, 0, stream>>>(T, H, r, w, k, v, a, b, dy, sa, ckpt, ds_final,
                                                           dr, dw, dk, dv, da, db, ds0);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int wkv7_head_size(void) { return wkv7::N; }
int wkv7_checkpoint_count(int T) { return wkv7::checkpoint_count(T); }

int wkv7_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                      const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                      const __nv_bfloat16* b, const float* s0, __nv_bfloat16* y, float* s_final,
                      float* sa, float* ckpt, cudaStream_t stream) {
    return launch_forward(B, T, H, r, w, k, v, a, b, s0, y, s_final, sa, ckpt, stream);
}

int wkv7_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                     const float* a, const float* b, const float* s0, float* y, float* s_final,
                     float* sa, float* ckpt, cudaStream_t stream) {
    return launch_forward(B, T, H, r, w, k, v, a, b, s0, y, s_final, sa, ckpt, stream);
}

int wkv7_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                       const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                       const __nv_bfloat16* b, const __nv_bfloat16* dy, const float* sa, const float* ckpt,
                       const float* ds_final, __nv_bfloat16* dr, __nv_bfloat16* dw, __nv_bfloat16* dk,
                       __nv_bfloat16* dv, __nv_bfloat16* da, __nv_bfloat16* db, float* ds0,
                       cudaStream_t stream) {
    return launch_backward(B, T, H, r, w, k, v, a, b, dy, sa, ckpt, ds_final, dr, dw, dk, dv, da, db, ds0, stream);
}

int wkv7_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                      const float* a, const float* b, const float* dy, const float* sa, const float* ckpt,
                      const float* ds_final, float* dr, float* dw, float* dk, float* dv, float* da, float* db,
                      float* ds0, cudaStream_t stream) {
    return launch_backward(B, T, H, r, w, k, v, a, b, dy, sa, ckpt, ds_final, dr, dw, dk, dv, da, db, ds0, stream);
}

}  // extern "C"
