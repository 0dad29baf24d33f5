"""Pure-PyTorch twins of :mod:`pyflowmap.ops`: same names, same signatures, same semantics.

They define what the fused kernels must compute; tests compare the two, and users can swap
one for the other to debug.
"""

from pyflowmap.reference.sampler import flowmap_step

__all__ = ["flowmap_step"]
