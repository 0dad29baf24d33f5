// Torch glue of pyflowmap::dual_attention and dual_attention_backward (schemas in
// csrc/pyflowmap.cpp; fake and autograd kernels in pyflowmap/ops/dual_attention.py).
//
// Two implementations of one function (math in dual_attention.h):
//  * the streaming kernels of dual_attention.cu (CUDA, float16 / bfloat16, head dim 64 or 128);
//  * a chunked path built from ATen ops for everything else (the CPU entries, and the CUDA ones
//    for float32 / float64 and other head dims): the same online-softmax recurrence over blocks
//    of keys, so memory is O(Nq x block + N x D) instead of the N x N probabilities and tangents
//    of math attention.
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "common/format.h"
#include "dual_attention/dual_attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace pyflowmap::dual_attention {
namespace {

// Keys per step of the chunked path: large enough that the matmuls run at speed, small enough
// that a [B, H, Nq, block] tile stays a small multiple of the inputs.
constexpr int64_t kBlock = 128;

using Opt = std::optional<at::Tensor>;

// The chunked path covers every floating dtype on every device; the streaming kernels
// (dual_attention.cu) are instantiated for the 16-bit ones.
using ChunkedTypes = dtypes<float, double, c10::Half, c10::BFloat16>;
using KernelTypes = dtypes<c10::Half, c10::BFloat16>;

struct AttnArgs {
  const char* op;
  at::Tensor q, k, v, qd, kd, vd;  // as given (absent tangents undefined)
  bool causal;
  double scale;
  at::Tensor g, gd, o, od, lse, mu;  // the backward's (gd undefined when absent); undefined for the forward
};

// The forward's checks for every device.
AttnArgs prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& q_dot, const Opt& k_dot,
                 const Opt& v_dot, bool causal, double scale, const char* op) {
  const at::Tensor qd = value_or_undefined(q_dot), kd = value_or_undefined(k_dot), vd = value_or_undefined(v_dot);
  const auto dt = q.scalar_type();
  check_floating(q, op, "q", ChunkedTypes::scalar_types, ChunkedTypes::scalar_types);
  TORCH_CHECK(q.dim() == 4, op, ": `q` must be [batch, heads, Nq, D], got shape ", fmt(q.sizes()));
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": `k` must be [batch, heads, Nk, D] matching `q` ", fmt(q.sizes()), ", got ", fmt(k.sizes()));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": `v` must have the shape of `k` ", fmt(k.sizes()), ", got ",
              fmt(v.sizes()));
  // dtype and device as q's, shape as the primal's
  const char* names[] = {"k", "v", "q_dot", "k_dot", "v_dot"};
  const at::Tensor* ts[] = {&k, &v, &qd, &kd, &vd};
  const at::Tensor* like[] = {&k, &v, &q, &k, &v};
  for (int i = 0; i < 5; ++i) {
    if (!ts[i]->defined()) continue;
    TORCH_CHECK(ts[i]->scalar_type() == dt && ts[i]->device() == q.device(), op, ": `", names[i],
                "` must match `q` in dtype and device (", dt, " on ", q.device().str(), "), got ",
                ts[i]->scalar_type(), " on ", ts[i]->device().str());
    TORCH_CHECK(ts[i]->sizes() == like[i]->sizes(), op, ": `", names[i], "` must have shape ",
                fmt(like[i]->sizes()), ", got ", fmt(ts[i]->sizes()));
  }
  TORCH_CHECK(std::isfinite(scale), op, ": `scale` must be finite");
  return {op, q, k, v, qd, kd, vd, causal, scale};
}

// ... and the backward's: dL/dO (dL/dO_dot optional) and the forward's outputs.
AttnArgs prepare_backward(const at::Tensor& grad_o, const Opt& grad_o_dot, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const Opt& q_dot, const Opt& k_dot, const Opt& v_dot,
                          const at::Tensor& o, const at::Tensor& o_dot, const at::Tensor& lse, const at::Tensor& mu,
                          bool causal, double scale) {
  AttnArgs a = prepare(q, k, v, q_dot, k_dot, v_dot, causal, scale, "dual_attention_backward");
  const at::Tensor gd = value_or_undefined(grad_o_dot);
  for (const auto& [t, name] : {std::pair{&grad_o, "grad_o"}, std::pair{&gd, "grad_o_dot"}, std::pair{&o, "o"},
                                std::pair{&o_dot, "o_dot"}}) {
    if (t->defined()) check_like(*t, q, a.op, name, "q");
  }
  const auto stat = acc_type(q.scalar_type());
  const std::string what = std::string("row statistic [batch, heads, Nq] in ") + c10::toString(stat);
  for (const auto& [t, name] : {std::pair{&lse, "lse"}, std::pair{&mu, "mu"}}) {
    check_saved(*t, t->sizes() == q.sizes().slice(0, 3), stat, q, a.op, name, what);
  }
  a.g = grad_o;
  a.gd = gd;
  a.o = o;
  a.od = o_dot;
  a.lse = lse;
  a.mu = mu;
  return a;
}

// [Nq, n] visibility of keys j0..j0+n-1 (bottom-right aligned causal mask).
at::Tensor causal_visible(int64_t nq, int64_t nk, int64_t j0, int64_t n, const at::TensorOptions& opt) {
  const auto io = opt.dtype(at::kLong);
  return at::arange(j0, j0 + n, io).unsqueeze(0) <= (at::arange(nq, io) + (nk - nq)).unsqueeze(1);
}

at::Tensor maybe(const at::Tensor& t, at::ScalarType ct) { return t.defined() ? t.to(ct) : t; }

at::Tensor block(const at::Tensor& t, int64_t j0, int64_t n, at::ScalarType ct) {
  return t.defined() ? t.narrow(2, j0, n).to(ct) : t;
}

at::Tensor tr(const at::Tensor& t) { return t.transpose(-1, -2); }

// S_dot of one key block, or undefined when neither Q nor K carries a tangent.
at::Tensor block_s_dot(const at::Tensor& q, const at::Tensor& qd, const at::Tensor& kb, const at::Tensor& kdb,
                       double scale) {
  at::Tensor sd;
  if (qd.defined()) sd = at::matmul(qd, tr(kb));
  if (kdb.defined()) sd = sd.defined() ? sd.add_(at::matmul(q, tr(kdb))) : at::matmul(q, tr(kdb));
  return sd.defined() ? sd.mul_(scale) : sd;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs forward_chunked(const AttnArgs& a) {
  const at::Tensor &q_in = a.q, &k_in = a.k, &v_in = a.v, &qd_in = a.qd, &kd_in = a.kd, &vd_in = a.vd;
  const bool causal = a.causal;
  const double scale = a.scale;
  const auto dt = q_in.scalar_type(), ct = acc_type(dt);
  const int64_t nq = q_in.size(2), nk = k_in.size(2);
  const auto copt = q_in.options().dtype(ct);
  const at::Tensor q = q_in.to(ct), qd = maybe(qd_in, ct);
  const bool tangent = qd.defined() || kd_in.defined() || vd_in.defined();
  const double inf = std::numeric_limits<double>::infinity();

  auto stat_shape = q.sizes().vec();
  stat_shape.back() = 1;
  at::Tensor m = at::full(stat_shape, -inf, copt), l = at::zeros(stat_shape, copt);
  at::Tensor r = tangent ? at::zeros(stat_shape, copt) : at::Tensor();
  at::Tensor acc = at::zeros(q.sizes(), copt);
  at::Tensor acc_t = tangent ? at::zeros(q.sizes(), copt) : at::Tensor();
  for (int64_t j0 = 0; j0 < nk; j0 += kBlock) {
    const int64_t n = std::min(kBlock, nk - j0);
    if (causal && j0 > nq - 1 + (nk - nq)) break;  // no query sees these keys
    const at::Tensor kb = block(k_in, j0, n, ct), vb = block(v_in, j0, n, ct);
    const at::Tensor kdb = block(kd_in, j0, n, ct), vdb = block(vd_in, j0, n, ct);
    at::Tensor s = at::matmul(q, tr(kb)).mul_(scale);
    if (causal) s.masked_fill_(causal_visible(nq, nk, j0, n, copt).logical_not(), -inf);
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(-1, true)));
    // rows that have seen no key yet keep m = -inf; shift them by 0 so exp() gives 0, not NaN
    const at::Tensor m_safe = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
    const at::Tensor alpha = at::exp(m - m_safe);
    const at::Tensor p = at::exp(s - m_safe);
    l.mul_(alpha).add_(p.sum(-1, true));
    acc.mul_(alpha).add_(at::matmul(p, vb));
    if (tangent) {
      acc_t.mul_(alpha);
      r.mul_(alpha);
      const at::Tensor sd = block_s_dot(q, qd, kb, kdb, scale);
      if (sd.defined()) {
        const at::Tensor ps = p * sd;
        r.add_(ps.sum(-1, true));
        acc_t.add_(at::matmul(ps, vb));
      }
      if (vdb.defined()) acc_t.add_(at::matmul(p, vdb));
    }
    m = m_new;
  }
  const at::Tensor empty = l.eq(0);
  const at::Tensor linv = at::where(empty, at::zeros_like(l), l.reciprocal());
  at::Tensor o = acc.mul_(linv);
  at::Tensor lse = at::where(empty, at::full_like(l, -inf), m + at::log(l)).squeeze(-1);
  at::Tensor mu, o_dot;
  if (tangent) {
    mu = r.mul_(linv);
    o_dot = acc_t.mul_(linv).sub_(mu * o);
    mu = mu.squeeze(-1);
  } else {
    mu = at::zeros_like(lse);
    o_dot = at::zeros_like(o);
  }
  return {o.to(dt), o_dot.to(dt), lse.to(ct).contiguous(), mu.to(ct).contiguous()};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads backward_chunked(const AttnArgs& a) {
  const at::Tensor &q_in = a.q, &k_in = a.k, &v_in = a.v, &qd_in = a.qd, &kd_in = a.kd, &vd_in = a.vd;
  const at::Tensor &g_in = a.g, &gd_in = a.gd, &o_in = a.o, &od_in = a.od, &lse_in = a.lse, &mu_in = a.mu;
  const bool causal = a.causal;
  const double scale = a.scale;
  const auto dt = q_in.scalar_type(), ct = acc_type(dt);
  const int64_t nq = q_in.size(2), nk = k_in.size(2);
  const auto copt = q_in.options().dtype(ct);
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor q = q_in.to(ct), qd = maybe(qd_in, ct), g = g_in.to(ct), gd = maybe(gd_in, ct);
  const at::Tensor o = o_in.to(ct);
  const at::Tensor mu = mu_in.to(ct).unsqueeze(-1);
  // rows that saw no key: lse = -inf; shifting by +inf makes their P exactly 0
  const at::Tensor lse = at::where(at::isinf(lse_in), at::full_like(lse_in, inf), lse_in).to(ct).unsqueeze(-1);
  at::Tensor dd, big_d = (g * o).sum(-1, true);
  if (gd.defined()) {
    dd = (gd * o).sum(-1, true);
    big_d.add_((gd * od_in.to(ct)).sum(-1, true)).sub_(dd * mu);
  }
  const bool want_sd = gd.defined() && (qd.defined() || kd_in.defined());
  at::Tensor dq = at::zeros(q.sizes(), copt);
  at::Tensor dqd = qd.defined() ? at::zeros(q.sizes(), copt) : at::Tensor();
  at::Tensor dk = at::zeros(k_in.sizes(), copt), dv = at::zeros(k_in.sizes(), copt);
  at::Tensor dkd = kd_in.defined() ? at::zeros(k_in.sizes(), copt) : at::Tensor();
  at::Tensor dvd = vd_in.defined() ? at::zeros(k_in.sizes(), copt) : at::Tensor();
  for (int64_t j0 = 0; j0 < nk; j0 += kBlock) {
    const int64_t n = std::min(kBlock, nk - j0);
    if (causal && j0 > nq - 1 + (nk - nq)) break;
    const at::Tensor kb = block(k_in, j0, n, ct), vb = block(v_in, j0, n, ct);
    const at::Tensor kdb = block(kd_in, j0, n, ct), vdb = block(vd_in, j0, n, ct);
    at::Tensor s = at::matmul(q, tr(kb)).mul_(scale);
    if (causal) s.masked_fill_(causal_visible(nq, nk, j0, n, copt).logical_not(), -inf);
    const at::Tensor p = at::exp(s.sub_(lse));
    at::Tensor dp = at::matmul(g, tr(vb));
    at::Tensor dvb = at::matmul(tr(p), g);
    at::Tensor dsd;
    if (gd.defined()) {
      const at::Tensor a = at::matmul(gd, tr(vb));
      if (want_sd) {
        const at::Tensor sd = block_s_dot(q, qd, kb, kdb, scale);
        const at::Tensor sdc = sd - mu;
        dp.add_(sdc * a).sub_(dd * sd);
        dvb.add_(at::matmul(tr(p * sdc), gd));
        dsd = p * (a - dd);
      }
      if (vdb.defined()) {
        dp.add_(at::matmul(gd, tr(vdb)));
        dvd.narrow(2, j0, n).copy_(at::matmul(tr(p), gd));
      }
    }
    const at::Tensor ds = p * dp.sub_(big_d);
    dq.add_(at::matmul(ds, kb), scale);
    at::Tensor dkb = at::matmul(tr(ds), q);
    if (dsd.defined()) {
      if (kdb.defined()) {
        dq.add_(at::matmul(dsd, kdb), scale);
        dkd.narrow(2, j0, n).copy_(at::matmul(tr(dsd), q).mul_(scale));
      }
      if (qd.defined()) {
        dqd.add_(at::matmul(dsd, kb), scale);
        dkb.add_(at::matmul(tr(dsd), qd));
      }
    }
    dk.narrow(2, j0, n).copy_(dkb.mul_(scale));
    dv.narrow(2, j0, n).copy_(dvb);
  }
  // absent tangents get 0-element gradients (the schema returns six tensors)
  auto out = [&](const at::Tensor& t) { return t.defined() ? t.to(dt) : at::empty({0}, q_in.options()); };
  return {out(dq), out(dk), out(dv), out(dqd), out(dkd), out(dvd)};
}

Outputs dual_attention_cpu(const AttnArgs& a) {
  check_backend(a.q, a.op, "q", c10::DeviceType::CPU);
  return forward_chunked(a);
}

Grads dual_attention_backward_cpu(const AttnArgs& a) {
  check_backend(a.q, a.op, "q", c10::DeviceType::CPU);
  return backward_chunked(a);
}

#ifdef PYFLOWMAP_WITH_CUDA
// The streaming kernels cover 16-bit inputs with head dim 64 / 128; the rest takes the chunked
// path, which runs on CUDA tensors just as well.
bool kernel_covers(const at::Tensor& q, const at::Tensor& k) {
  const int64_t bh = q.size(0) * q.size(1);
  return KernelTypes::contains(q.scalar_type()) && (q.size(3) == 64 || q.size(3) == 128) && bh <= INT32_MAX &&
         q.size(2) <= INT32_MAX && k.size(2) <= INT32_MAX && (q.size(2) + 63) / 64 <= 65535 &&
         (k.size(2) + 63) / 64 <= 65535;
}

// The kernels read 16-byte vectors: the head dim contiguous and every row start aligned.
at::Tensor vector_ready(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(2) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

// q, k, v, q_dot, k_dot, v_dot in the kernels' order, each vector-ready (absent ones undefined).
std::array<at::Tensor, 6> vector_ready(const AttnArgs& a) {
  std::array<at::Tensor, 6> ts;
  const at::Tensor* src[] = {&a.q, &a.k, &a.v, &a.qd, &a.kd, &a.vd};
  for (int i = 0; i < 6; ++i) ts[i] = src[i]->defined() ? vector_ready(*src[i]) : at::Tensor();
  return ts;
}

template <typename TT>
Inputs<cuda_type_t<TT>> make_inputs(const std::array<at::Tensor, 6>& ts) {
  Inputs<cuda_type_t<TT>> in{};
  for (int i = 0; i < 6; ++i) {
    in.ptr[i] = cuda_cptr<TT>(ts[i]);
    in.stride[i] = ts[i].defined() ? Strides{ts[i].stride(0), ts[i].stride(1), ts[i].stride(2)} : Strides{0, 0, 0};
  }
  return in;
}

Problem make_problem(const AttnArgs& a) {
  return {static_cast<int>(a.q.size(0)), static_cast<int>(a.q.size(1)), static_cast<int>(a.q.size(2)),
          static_cast<int>(a.k.size(2)),  static_cast<int>(a.q.size(3)), a.causal, static_cast<float>(a.scale),
          a.qd.defined(), a.kd.defined(), a.vd.defined()};
}

Outputs dual_attention_cuda(const AttnArgs& a) {
  check_backend(a.q, a.op, "q", c10::DeviceType::CUDA);
  if (!kernel_covers(a.q, a.k)) return forward_chunked(a);
  const at::Tensor& q = a.q;
  const c10::cuda::CUDAGuard guard(q.device());
  const std::array<at::Tensor, 6> ts = vector_ready(a);
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor o_dot = at::empty_like(o);
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  at::Tensor mu = at::empty_like(lse);
  const Problem p = make_problem(a);
  dispatch_types(KernelTypes{}, q.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH(forward_cuda<T>(make_inputs<TT>(ts), cuda_mptr<TT>(o), cuda_mptr<TT>(o_dot),
                                           mptr<float>(lse), mptr<float>(mu), p, current_stream()),
                           a.op);
  });
  return {o, o_dot, lse, mu};
}

Grads dual_attention_backward_cuda(const AttnArgs& a) {
  check_backend(a.q, a.op, "q", c10::DeviceType::CUDA);
  if (!kernel_covers(a.q, a.k)) return backward_chunked(a);
  const at::Tensor &q = a.q, &k = a.k, &gd = a.gd;
  const c10::cuda::CUDAGuard guard(q.device());
  const std::array<at::Tensor, 6> ts = vector_ready(a);
  const at::Tensor gc = a.g.contiguous(), gdc = gd.defined() ? gd.contiguous() : at::Tensor();
  const at::Tensor oc = a.o.contiguous(), odc = a.od.contiguous(), lsec = a.lse.contiguous(), muc = a.mu.contiguous();
  const auto fopt = q.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  const auto topt = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor scratch = at::empty({3 * q.size(0) * q.size(1) * q.size(2)}, fopt);
  at::Tensor dq = at::zeros(q.sizes(), fopt);
  at::Tensor dqd = a.qd.defined() ? at::zeros(q.sizes(), fopt) : at::Tensor();
  // keys are always written by the kernel when there are queries; with none, or for a tangent
  // that gets no gradient (no dL/dO_dot), the result is zeros
  auto key_grad = [&](bool present, bool written) {
    if (!present) return at::Tensor();
    return written && q.size(2) > 0 ? at::empty(k.sizes(), topt) : at::zeros(k.sizes(), topt);
  };
  at::Tensor dk = key_grad(true, true), dv = key_grad(true, true);
  at::Tensor dkd = key_grad(a.kd.defined(), gd.defined()), dvd = key_grad(a.vd.defined(), gd.defined());
  const Problem p = make_problem(a);
  dispatch_types(KernelTypes{}, q.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH(
        backward_cuda<T>(make_inputs<TT>(ts), cuda_cptr<TT>(gc), cuda_cptr<TT>(gdc), cuda_cptr<TT>(oc),
                         cuda_cptr<TT>(odc), cptr<float>(lsec), cptr<float>(muc), mptr<float>(scratch),
                         mptr<float>(dq), mptr<float>(dqd), cuda_mptr<TT>(dk), cuda_mptr<TT>(dv),
                         gd.defined() ? cuda_mptr<TT>(dkd) : nullptr, gd.defined() ? cuda_mptr<TT>(dvd) : nullptr, p,
                         current_stream()),
        a.op);
  });
  auto out = [&](const at::Tensor& t) { return t.defined() ? t.to(q.scalar_type()) : at::empty({0}, q.options()); };
  return {out(dq), out(dk), out(dv), out(dqd), out(dkd), out(dvd)};
}
#endif

// The schemas' entries for backend Run (the functions above).
template <auto Run>
Outputs dual_attention_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& q_dot,
                             const Opt& k_dot, const Opt& v_dot, bool causal, double scale) {
  return Run(prepare(q, k, v, q_dot, k_dot, v_dot, causal, scale, "dual_attention"));
}

template <auto Run>
Grads dual_attention_backward_entry(const at::Tensor& grad_o, const Opt& grad_o_dot, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const Opt& q_dot, const Opt& k_dot,
                                    const Opt& v_dot, const at::Tensor& o, const at::Tensor& o_dot,
                                    const at::Tensor& lse, const at::Tensor& mu, bool causal, double scale) {
  return Run(prepare_backward(grad_o, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, causal, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_attention", &dual_attention_entry<dual_attention_cpu>);
  m.impl("dual_attention_backward", &dual_attention_backward_entry<dual_attention_backward_cpu>);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("dual_attention", &dual_attention_entry<dual_attention_cuda>);
  m.impl("dual_attention_backward", &dual_attention_backward_entry<dual_attention_backward_cuda>);
}
#endif

}  // namespace pyflowmap::dual_attention
