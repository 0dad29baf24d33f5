"""The one accumulation-dtype rule of pyflowmap's kernels and their twins."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) accumulates in float32.

    Also the dtype of times, per-sample losses and loss weights that go with a tensor of ``dtype``.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
