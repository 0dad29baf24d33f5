"""pyflowmap: flow maps and consistency models in PyTorch.

    import pyflowmap as pf
    net = pf.nn.FlowMapMLP(dim=2)                      # any module v(x, s, t)
    flowmap = pf.FlowMap(net)                          # X_{s,t}(x) = x + (t - s) v_{s,t}(x)
    objective = pf.objectives.LSD(derivative="jvp")    # or ESD, PSD, FM, LMD, EMD, PFMM
    loss = objective(flowmap, x1).loss                 # x1: a data batch [B, ...]
    x = pf.sample(flowmap, noise, steps=4)             # 4 flow-map jumps
    # conditional: FlowMapMLP(num_classes=K); objective(flowmap, x1, c=labels); sample(..., c=, guidance=)

Layers: this core (flow maps, objectives, samplers, ``nn`` dual layers, ``ops`` fused kernels
paired with their ``reference`` twins), :mod:`pyflowmap.training` (the shared loop) and the
apps :mod:`pyflowmap.toy2d` and :mod:`pyflowmap.images`; docs/architecture.md maps them.
"""

from pyflowmap import _moved, conditioning, distributed, nn, objectives, ops, reference
from pyflowmap._build import build_info, has_cuda_kernels
from pyflowmap.consistency import EDMConsistency, EDMSigmaPath
from pyflowmap.derivatives import JVP, Dual, FiniteDifference, resolve_mode
from pyflowmap.flowmap import FlowMap
from pyflowmap.interpolants import GaussianBase, LinearInterpolant, TrigInterpolant
from pyflowmap.objectives import make_objective
from pyflowmap.sampling import draw, sample, sample_ode, time_grid
from pyflowmap.times import TimeSampler
from pyflowmap.trigflow import TrigFlowConsistency, TrigFlowPath

_moved.install()  # pre-restructure import paths (pyflowmap.train, pyflowmap.config, ...) keep working

__version__ = "0.1.0"

__all__ = [
    "build_info", "has_cuda_kernels", "conditioning", "distributed", "nn", "objectives", "ops", "reference",
    "FlowMap", "JVP", "Dual", "FiniteDifference", "resolve_mode",
    "LinearInterpolant", "TrigInterpolant", "EDMSigmaPath", "EDMConsistency", "GaussianBase", "TimeSampler",
    "TrigFlowPath", "TrigFlowConsistency",
    "make_objective", "sample", "sample_ode", "draw", "time_grid",
]
