// Just enough of CUDA to run wkv7_kernels.cuh on the CPU, for tests on machines without a GPU.
// A block runs as N host threads: `__shared__` becomes `static` (so blocks must run one at a time),
// __syncthreads() is a std::barrier, threadIdx/blockIdx are thread-local, and bf16 rounds to nearest even
// as the GPU's __float2bfloat16 does.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline std::barrier<>* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float expf(float x) { return std::exp(x); }

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}

// Runs `kernel` on a grid of `blocks` blocks of `threads` host threads each, one block at a time.
template <typename Kernel, typename... Args>
void run_grid(int blocks, int threads, Kernel kernel, Args... args) {
    for (int block = 0; block < blocks; block++) {
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> workers;
        for (int thread = 0; thread < threads; thread++)
            workers.emplace_back([=] {
                threadIdx.x = thread;
                blockIdx.x = block;
                kernel(args...);
            });
        for (auto& t : workers) t.join();
    }
}
