// Device helpers shared by the WKV-6 and WKV-7 kernels: fp32/bf16 loads and stores, and the dot product over
// the head dimension. Include wkv6.h or wkv7.h (CUDA) or cpu_emulation.h first.
#pragma once

namespace wkv {

constexpr int HEAD_SIZE = 64;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Dot product over the head dimension, in four independent sums (a shorter dependency chain).
__device__ __forceinline__ float dot(const float* x, const float* y) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
    for (int j = 0; j < HEAD_SIZE; j += 4) {
        s0 += x[j] * y[j];
        s1 += x[j + 1] * y[j + 1];
        s2 += x[j + 2] * y[j + 2];
        s3 += x[j + 3] * y[j + 3];
    }
    return (s0 + s1) + (s2 + s3);
}

}  // namespace wkv
