// C API of the WKV-7 CUDA kernels: raw device pointers, contiguous tensors, head size 64.
// Each call launches one kernel on `stream` and returns its cudaError_t (0 on success).
// Shapes: r w k v a b y dy and their gradients [B,T,H,64]; s0 s_final ds_final ds0 [B,H,64,64] fp32,
// [value, key] layout; sa [B,T,H,64] fp32; ckpt [B,H,wkv7_checkpoint_count(T),64,64] fp32.
// Any T >= 1. Pass sa = ckpt = NULL to the forward call when no backward call follows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

int wkv7_head_size(void);
int wkv7_checkpoint_count(int T);

int wkv7_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                      const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                      const __nv_bfloat16* b, const float* s0, __nv_bfloat16* y, float* s_final,
                      float* sa, float* ckpt, cudaStream_t stream);
int wkv7_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                     const float* a, const float* b, const float* s0, float* y, float* s_final,
                     float* sa, float* ckpt, cudaStream_t stream);

int wkv7_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                       const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* a,
                       const __nv_bfloat16* b, const __nv_bfloat16* dy, const float* sa, const float* ckpt,
                       const float* ds_final, __nv_bfloat16* dr, __nv_bfloat16* dw, __nv_bfloat16* dk,
                       __nv_bfloat16* dv, __nv_bfloat16* da, __nv_bfloat16* db, float* ds0,
                       cudaStream_t stream);
int wkv7_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                      const float* a, const float* b, const float* dy, const float* sa, const float* ckpt,
                      const float* ds_final, float* dr, float* dw, float* dk, float* dv, float* da, float* db,
                      float* ds0, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
