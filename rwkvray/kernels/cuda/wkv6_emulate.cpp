// The WKV-6 kernels run on the CPU (see cpu_emulation.h), behind the same C API as wkv6.h with the prefix
// wkv6_emulate_ and no stream. Tests build it with:  c++ -O2 -std=c++20 -shared -fPIC -pthread
#include "cpu_emulation.h"
#include "wkv6_kernels.cuh"

extern "C" {

int wkv6_emulate_checkpoint_count(int T) { return wkv6::checkpoint_count(T); }

void wkv6_emulate_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                              const float* u, const float* s0, float* y, float* s_final, float* ckpt) {
    run_grid(B * H, wkv6::N, wkv6::forward_kernel<float>, T, H, r, w, k, v, u, s0, y, s_final, ckpt);
}

void wkv6_emulate_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                               const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u, const float* s0,
                               __nv_bfloat16* y, float* s_final, float* ckpt) {
    run_grid(B * H, wkv6::N, wkv6::forward_kernel<__nv_bfloat16>, T, H, r, w, k, v, u, s0, y, s_final, ckpt);
}

void wkv6_emulate_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k,
                               const float* v, const float* u, const float* dy, const float* ckpt,
                               const float* ds_final, float* dr, float* dw, float* dk, float* dv, float* du,
                               float* ds0) {
    run_grid(B * H, wkv6::N, wkv6::backward_kernel<float>, T, H, r, w, k, v, u, dy, ckpt, ds_final, dr, dw, dk, dv,
             du, ds0);
}

void wkv6_emulate_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                                const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u,
                                const __nv_bfloat16* dy, const float* ckpt, const float* ds_final,
                                __nv_bfloat16* dr, __nv_bfloat16* dw, __nv_bfloat16* dk, __nv_bfloat16* dv,
                                float* du, float* ds0) {
    run_grid(B * H, wkv6::N, wkv6::backward_kernel<__nv_bfloat16>, T, H, r, w, k, v, u, dy, ckpt, ds_final, dr, dw,
             dk, dv, du, ds0);
}

}  // extern "C"
