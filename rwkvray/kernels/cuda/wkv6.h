// C API of the WKV-6 CUDA kernels: raw device pointers, contiguous tensors, head size 64.
// Each call launches one kernel on `stream` and returns its cudaError_t (0 on success).
// Shapes: r w k v y dy and their gradients [B,T,H,64]; u [H,64] fp32; du [B,H,64] fp32 (sum it over B);
// s0 s_final ds_final ds0 [B,H,64,64] fp32, [value, key] layout; ckpt [B,H,wkv6_checkpoint_count(T),64,64] fp32.
// Any T >= 1. Pass ckpt = NULL to the forward call when no backward call follows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

int wkv6_head_size(void);
int wkv6_checkpoint_count(int T);

int wkv6_forward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                      const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u, const float* s0,
                      __nv_bfloat16* y, float* s_final, float* ckpt, cudaStream_t stream);
int wkv6_forward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                     const float* u, const float* s0, float* y, float* s_final, float* ckpt, cudaStream_t stream);

int wkv6_backward_bf16(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* w,
                       const __nv_bfloat16* k, const __nv_bfloat16* v, const float* u, const __nv_bfloat16* dy,
                       const float* ckpt, const float* ds_final, __nv_bfloat16* dr, __nv_bfloat16* dw,
                       __nv_bfloat16* dk, __nv_bfloat16* dv, float* du, float* ds0, cudaStream_t stream);
int wkv6_backward_f32(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                      const float* u, const float* dy, const float* ckpt, const float* ds_final, float* dr,
                      float* dw, float* dk, float* dv, float* du, float* ds0, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
