import torch

import pyflowmap


def test_build_info_reports_the_build():
    info = pyflowmap.build_info()
    assert info["cpu"] is True
    assert set(info) >= {"cpu", "cuda", "cuda_archs", "torch_version", "torch_runtime", "cuda_available", "openmp"}
    # compiled against the torch that is running (same major.minor.patch)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must name its architectures"
        assert torch.version.cuda is not None
    else:
        assert info["cuda_archs"] == ""
        assert not info["cuda_available"]


def test_ops_are_registered_with_the_dispatcher():
    op = torch.ops.pyflowmap.flowmap_step.default
    assert "flowmap_step" in str(op._schema)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
    if pyflowmap.build_info()["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
