// The dispatcher schemas of every pyflowmap op (one place to read the op surface) and the small
// pybind11 module that reports what this build contains.
//
// Registration (csrc/README.md has the family layout): each <family>/<op>_torch.cpp registers
// one kernel per backend, under TORCH_LIBRARY_IMPL(pyflowmap, CPU) and (CUDA builds)
// TORCH_LIBRARY_IMPL(pyflowmap, CUDA). Both are instantiations of one entry template,
// `&<op>_entry<Run>`, that runs the family's device-independent prepare() (every argument
// check, contiguous inputs) and hands its result to the backend's Run function (<op>_cpu /
// <op>_cuda: backend check, allocation, dispatch_types, launch), so the two backends cannot
// drift apart in what they accept. The one exception is dual_linear: a single
// CompositeExplicitAutograd ATen composition that serves every device.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef PYFLOWMAP_WITH_CUDA
#define PYFLOWMAP_WITH_CUDA 0
#endif

TORCH_LIBRARY(pyflowmap, m) {
  // Fake (meta) and autograd kernels are registered from Python, one module per op family;
  // set_python_module (it applies to the defs that follow) lets torch import that module when
  // it needs them, e.g. under torch.compile before `import pyflowmap` ran.
  m.set_python_module("pyflowmap.ops.sampler");
  // x + (t - s) * v with s, t scalar or per-sample [batch] tensors (float32; float64 for float64 x).
  m.def("flowmap_step(Tensor x, Tensor v, Tensor s, Tensor t) -> Tensor");

  // Dual activations on stacked [z; z_dot] (kind: 'gelu' exact, 'silu').
  m.set_python_module("pyflowmap.ops.dual_act");
  m.def("dual_act(Tensor zz, str kind) -> Tensor");
  m.def("dual_act_backward(Tensor grad, Tensor zz, str kind) -> Tensor");

  // Dual LayerNorm / RMSNorm (center=False) / GroupNorm on stacked [x; x_dot], rows of `len`
  // elements in `groups` per sample, `spatial` consecutive elements per affine channel.
  m.set_python_module("pyflowmap.ops.dual_norm");
  m.def("dual_norm(Tensor xx, Tensor? weight, Tensor? bias, int len, int groups, int spatial, bool center, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("dual_norm_backward(Tensor grad, Tensor xx, Tensor? weight, Tensor mean, Tensor rstd, int len, "
        "int groups, int spatial, bool center, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Linear layer on stacked [x; x_dot]: one GEMM, bias on the primal half.
  m.set_python_module("pyflowmap.ops.dual_linear");
  m.def("dual_linear(Tensor xx, Tensor weight, Tensor? bias) -> Tensor");

  // Fused flow-map loss: per-sample metric ('l2sq' | 'pseudo_huber' with c) of pred - target,
  // optional per-sample weight, mean; returns (loss, unweighted per-sample metric).
  m.set_python_module("pyflowmap.ops.losses");
  m.def("flowmap_loss(Tensor pred, Tensor? target, Tensor? weight, str metric, float c) -> (Tensor, Tensor)");
  m.def("flowmap_loss_backward(Tensor grad_loss, Tensor? grad_per_sample, Tensor pred, Tensor? target, "
        "Tensor? weight, Tensor per_sample, str metric, float c) -> Tensor");
  // The same for the central-difference residual (plus - minus) * inv_2h - target, formed in
  // float64 inside the kernel whatever the input dtype.
  m.def("flowmap_fd_loss(Tensor plus, Tensor minus, Tensor? target, Tensor? weight, float inv_2h, str metric, "
        "float c) -> (Tensor, Tensor)");
  m.def("flowmap_fd_loss_backward(Tensor grad_loss, Tensor? grad_per_sample, Tensor plus, Tensor minus, "
        "Tensor? target, Tensor? weight, Tensor per_sample, float inv_2h, str metric, float c) -> Tensor");

  // JVP attention on [batch, heads, N, D] (csrc/dual_attention/dual_attention.h has the math):
  // returns (O, O_dot, lse, mu); any tangent may be absent (zero). Causal masks are
  // bottom-right aligned. The backward takes dL/dO and, optionally, dL/dO_dot (absent: the
  // primal-only path) and returns (dq, dk, dv, dq_dot, dk_dot, dv_dot), 0-element tensors for
  // absent tangents.
  m.set_python_module("pyflowmap.ops.dual_attention");
  m.def("dual_attention(Tensor q, Tensor k, Tensor v, Tensor? q_dot, Tensor? k_dot, Tensor? v_dot, bool causal, "
        "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dual_attention_backward(Tensor grad_o, Tensor? grad_o_dot, Tensor q, Tensor k, Tensor v, Tensor? q_dot, "
        "Tensor? k_dot, Tensor? v_dot, Tensor o, Tensor o_dot, Tensor lse, Tensor mu, bool causal, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "pyflowmap compiled kernels; ops are reached through torch.ops.pyflowmap";
  mod.def("build_info", [] {
    py::dict info;
    info["cpu"] = true;
    info["cuda"] = static_cast<bool>(PYFLOWMAP_WITH_CUDA);
    info["cuda_archs"] = std::string(PYFLOWMAP_CUDA_ARCHS);
    info["torch_version"] = std::string(PYFLOWMAP_TORCH_VERSION);
    info["compiler"] = std::string(PYFLOWMAP_CXX_COMPILER);
    info["native"] = static_cast<bool>(PYFLOWMAP_NATIVE_BUILD);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
