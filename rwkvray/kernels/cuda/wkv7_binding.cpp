// PyTorch binding of the WKV-7 CUDA kernels (C API in wkv7.h). Shape and dtype checks live here, so the
// kernels can trust their raw pointers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "wkv7.h"

namespace {

const char* dtype_name(const at::Tensor& x) { return c10::toString(x.scalar_type()); }

void check_sequence(const at::Tensor& x, const at::Tensor& like, const char* name) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7: ", name, " is ", dtype_name(x), ", r is ",
                dtype_name(like));
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", r has ", like.sizes());
}

void check_state(const at::Tensor& x, const at::Tensor& r, const char* name) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kFloat,
                "wkv7: ", name, " must be a contiguous float32 CUDA tensor");
    TORCH_CHECK(x.sizes() == at::IntArrayRef({r.size(0), r.size(2), r.size(3), r.size(3)}), "wkv7: ", name,
                " has shape ", x.sizes(), ", expected [B,H,N,N]");
}

void check_inputs(const std::vector<at::Tensor>& rwkvab) {
    const at::Tensor& r = rwkvab[0];
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv7_head_size(), "wkv7: r must be [B,T,H,", wkv7_head_size(),
                "], got ", r.sizes());
    TORCH_CHECK(r.size(1) >= 1, "wkv7: the sequence is empty");
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kFloat,
                "wkv7: inputs must be bfloat16 or float32, got ", dtype_name(r));
    const char* names[] = {"r", "w", "k", "v", "a", "b"};
    for (int i = 0; i < 6; i++) check_sequence(rwkvab[i], r, names[i]);
}

void check_launch(int err, const char* what) {
    TORCH_CHECK(err == 0, "wkv7 ", what, " kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

template <typename T>
T* ptr(const at::Tensor& x) {
    return reinterpret_cast<T*>(x.data_ptr());
}

// Returns y, s_final and, when keep_for_backward, the sa and checkpoint buffers the backward pass needs.
std::vector<at::Tensor> forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& a, const at::Tensor& b, const at::Tensor& s0,
                                bool keep_for_backward) {
    check_inputs({r, w, k, v, a, b});
    check_state(s0, r, "s0");
    const c10::cuda::CUDAGuard guard(r.device());
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r), s_final = at::empty({B, H, N, N}, f32);
    at::Tensor sa, ckpt;
    if (keep_for_backward) {
        sa = at::empty({B, T, H, N}, f32);
        ckpt = at::empty({B, H, wkv7_checkpoint_count(T), N, N}, f32);
    }
    float* sa_ptr = keep_for_backward ? ptr<float>(sa) : nullptr;
    float* ckpt_ptr = keep_for_backward ? ptr<float>(ckpt) : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(r.get_device()).stream();
    int err;
    if (r.scalar_type() == at::kBFloat16) {
        using bf = __nv_bfloat16;
        err = wkv7_forward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<bf>(a), ptr<bf>(b),
                                ptr<float>(s0), ptr<bf>(y), ptr<float>(s_final), sa_ptr, ckpt_ptr, stream);
    } else {
        err = wkv7_forward_f32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(a),
                               ptr<float>(b), ptr<float>(s0), ptr<float>(y), ptr<float>(s_final), sa_ptr, ckpt_ptr,
                               stream);
    }
    check_launch(err, "forward");
    if (keep_for_backward) return {y, s_final, sa, ckpt};
    return {y, s_final};
}

// Returns dr, dw, dk, dv, da, db (dtype of r) and ds0 (float32).
std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& a, const at::Tensor& b, const at::Tensor& dy,
                                 const at::Tensor& ds_final, const at::Tensor& sa, const at::Tensor& ckpt) {
    check_inputs({r, w, k, v, a, b});
    check_state(ds_final, r, "ds_final");
    check_sequence(dy, r, "dy");
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    TORCH_CHECK(sa.is_contiguous() && sa.scalar_type() == at::kFloat && sa.sizes() == r.sizes(),
                "wkv7: sa does not match r");
    TORCH_CHECK(ckpt.is_contiguous() && ckpt.scalar_type() == at::kFloat &&
                    ckpt.sizes() == at::IntArrayRef({B, H, wkv7_checkpoint_count(T), N, N}),
                "wkv7: the checkpoint buffer does not match r");
    const c10::cuda::CUDAGuard guard(r.device());
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r);
    at::Tensor dv = at::empty_like(r), da = at::empty_like(r), db = at::empty_like(r);
    at::Tensor ds0 = at::empty_like(ds_final);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(r.get_device()).stream();
    int err;
    if (r.scalar_type() == at::kBFloat16) {
        using bf = __nv_bfloat16;
        err = wkv7_backward_bf16(B, T, H, ptr<bf>(r), ptr<bf>(w), ptr<bf>(k), ptr<bf>(v), ptr<bf>(a), ptr<bf>(b),
                                 ptr<bf>(dy), ptr<float>(sa), ptr<float>(ckpt), ptr<float>(ds_final), ptr<bf>(dr),
                                 ptr<bf>(dw), ptr<bf>(dk), ptr<bf>(dv), ptr<bf>(da), ptr<bf>(db), ptr<float>(ds0),
                                 stream);
    } else {
        err = wkv7_backward_f32(B, T, H, ptr<float>(r), ptr<float>(w), ptr<float>(k), ptr<float>(v), ptr<float>(a),
                                ptr<float>(b), ptr<float>(dy), ptr<float>(sa), ptr<float>(ckpt),
                                ptr<float>(ds_final), ptr<float>(dr), ptr<float>(dw), ptr<float>(dk),
                                ptr<float>(dv), ptr<float>(da), ptr<float>(db), ptr<float>(ds0), stream);
    }
    check_launch(err, "backward");
    return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-7 forward with an initial state");
    m.def("backward", &backward, "WKV-7 backward: gradients of r, w, k, v, a, b and s0");
}
