// The WKV-7 kernels run on the CPU (see cpu_emulation.h), behind the same C API as wkv7.h with the prefix
// wkv7_emulate_ and no stream. Tests build it with:  c++ -O2 -std=c++20 -shared -fPIC -pthread
#include "cpu_emulation.h"
#include "wkv7_kernels.cuh"

extern "C" {

int wkv7_emulate_checkpoint_count(int T) { return wkv7::checkpoint_count(T); }

void wkv7_emulate_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                              const float* a, const float* b, const float* s0, float* y, float* s_final,
                              float* sa, float* ckpt) {
    run_grid(B * H, wkv7::N, wkv7::forward_kernel<float>, T, H, r, w, k, v, a, b, s0, y, s_final, sa, ckpt);
}

void wkv7_emulate_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                               const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                               const __nv_bfloat16* b, const float* s0, __nv_bfloat16* y, float* s_final,
                               float* sa, float* ckpt) {
    run_grid(B * H, wkv7::N, wkv7::forward_kernel<__nv_bfloat16>, T, H, r, w, k, v, a, b, s0, y, s_final, sa, ckpt);
}

void wkv7_emulate_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k,
                               const float* v, const float* a, const float* b, const float* dy, const float* sa,
                               const float* ckpt, const float* ds_final, float* dr, float* dw, float* dk,
                               float* dv, float* da, float* db, float* ds0) {
    run_grid(B * H, wkv7::N, wkv7::backward_kernel<float>, T, H, r, w, k, v, a, b, dy, sa, ckpt, ds_final, dr, dw,
             dk, dv, da, db, ds0);
}

void wkv7_emulate_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                                const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                                const __nv_bfloat16* b, const __nv_bfloat16* dy, const float* sa,
                                const float* ckpt, const float* ds_final, __nv_bfloat16* dr, __nv_bfloat16* dw,
                                __nv_bfloat16* dk, __nv_bfloat16* dv, __nv_bfloat16* da, __nv_bfloat16* db,
                                float* ds0) {
    run_grid(B * H, wkv7::N, wkv7::backward_kernel<__nv_bfloat16>, T, H, r, w, k, v, a, b, dy, sa, ckpt, ds_final,
             dr, dw, dk, dv, da, db, ds0);
}

}  // extern "C"
