"""Precision-tied comparison (docs/kernels.md section 8): a kernel run in low precision may be off from the
float64 truth by at most twice the error of the reference twin run in the same precision,
plus a few units of rounding of the output dtype.

In float64 the "same-precision reference" IS the truth (its error is 0), so the floor alone
decides there; it covers different summation orders and libm implementations (64 ulps).
"""

import torch


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    out, exact = out.detach().double(), exact.detach().double()
    return float(((out - exact).abs() / (1 + exact.abs())).max())


def assert_within_reference_error(out, ref_lowp, exact, ulps: float | None = None):
    eps = torch.finfo(out.dtype).eps
    if ulps is None:
        ulps = 64.0 if out.dtype == torch.float64 else 8.0
    got, allowed = rel_err(out, exact), 2 * rel_err(ref_lowp, exact) + ulps * eps
    assert got <= allowed, f"kernel error {got:.3e} > allowed {allowed:.3e} (reference error {rel_err(ref_lowp, exact):.3e})"
