// PyTorch binding of the WKV-6 CUDA kernels (C API in wkv6.h). Shape and dtype checks live here, so the
// kernels can trust their raw pointers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "wkv6.h"

namespace {

const char* dtype_name(const at::Tensor& x) { return c10::toString(x.scalar_type()); }

void check_sequence(const at::Tensor& x, const at::Tensor& like, const char* name) {
    TORCH_CHECK(x.is_cuda(), "wkv6: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.is_contiguous(), "wkv6: ", name, " must be contiguous");
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv6: ", name, " is ", dtype_name(x), ", r is ",
                dtype_name(like));
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv6: ", name, " has shape ", x.sizes(), ", r has ", like.sizes());
}

void check_f32(const at::Tensor& x, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kFloat,
                "wkv6: ", name, " must be a contiguous float32 CUDA tensor");
    TORCH_CHECK(x.sizes() == shape, "wkv6: ", name, " has shape ", x.sizes(), ", expected ", shape);
}

void check_inputs(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& u) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv6_head_size(), "wkv6: r must be [B,T,H,", wkv6_head_size(),
                "], got ", r.sizes());
    TORCH_CHECK(r.size(1) >= 1, "wkv6: the sequence is empty");
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kFloat,
                "wkv6: inputs must be bfloat16 or float32, got ", dtype_name(r));
    check_sequence(r, r, "r");
    check_sequence(w, r, "w");
    check_sequence(k, r, "k");
    check_sequence(v, r, "v");
    check_f32(u, {r.size(2), r.size(3)}, "u");
}

void check_launch(int err, const char* what) {
    TORCH_CHECK(err == 0, "wkv6 ", what, " kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

template <typename T>
T* ptr(const at::Tensor& x) {
    return reinterpret_cast<T*>(x.data_ptr());
}

// Returns y, s_final and, when keep_for_backward, the checkpoint buffer the backward pass needs.
std::vector<at::Tensor> forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& u, const at::Tensor& s0, bool keep_for_backward) {
    check_inputs(r, w, k, v, u);
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_f32(s0, {B, H, N, N}, "s0");
    const c10::cuda::CUDAGuard guard(r.device());
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r), s_final = at::empty({B, H, N, N}, f32);
    at::Tensor ckpt;
    if (keep_for_backward) ckpt = at::empty({B, H, wkv6_checkpoint_count(T), N, N}, f32);
    float* ckpt_ptr = keep_for_backward ? ptr<float>(ckpt) : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(r.get_device()).stream();
    int err;
    if (r.scalar_type() == at::kBFloat16) {
        using bf = __nv_bfloat16;
        err = wkv6_forward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<float>(u),
                                ptr<float>(s0), ptr<bf>(y), ptr<float>(s_final), ckpt_ptr, stream);
    } else {
        err = wkv6_forward_f32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(u),
                               ptr<float>(s0), ptr<float>(y), ptr<float>(s_final), ckpt_ptr, stream);
    }
    check_launch(err, "forward");
    if (keep_for_backward) return {y, s_final, ckpt};
    return {y, s_final};
}

// Returns dr, dw, dk, dv (dtype of r), du [H,N] and ds0 [B,H,N,N] (float32).
std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& u, const at::Tensor& dy, const at::Tensor& ds_final,
                                 const at::Tensor& ckpt) {
    check_inputs(r, w, k, v, u);
    check_sequence(dy, r, "dy");
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_f32(ds_final, {B, H, N, N}, "ds_final");
    check_f32(ckpt, {B, H, wkv6_checkpoint_count(T), N, N}, "the checkpoint buffer");
    const c10::cuda::CUDAGuard guard(r.device());
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
    at::Tensor du = at::empty({B, H, N}, ds_final.options()), ds0 = at::empty_like(ds_final);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(r.get_device()).stream();
    int err;
    if (r.scalar_type() == at::kBFloat16) {
        using bf = __nv_bfloat16;
        err = wkv6_backward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<float>(u),
                                 ptr<bf>(dy), ptr<float>(ckpt), ptr<float>(ds_final), ptr<bf>(dr), ptr<bf>(dw),
                                 ptr<bf>(dk), ptr<bf>(dv), ptr<float>(du), ptr<float>(ds0), stream);
    } else {
        err = wkv6_backward_f32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(u),
                                ptr<float>(dy), ptr<float>(ckpt), ptr<float>(ds_final), ptr<float>(dr),
                                ptr<float>(dw), ptr<float>(dk), ptr<float>(dv), ptr<float>(du), ptr<float>(ds0),
                                stream);
    }
    check_launch(err, "backward");
    return {dr, dw, dk, dv, du.sum(0), ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-6 forward with an initial state");
    m.def("backward", &backward, "WKV-6 backward: gradients of r, w, k, v, u and s0");
}
