import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import pyflowmap

# "ci" bounds example counts so the suite stays within minutes on 2 cores; "thorough" for local soak runs.
settings.register_profile("ci", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# under compute-sanitizer every kernel runs 10-100x slower: a few examples per property
settings.register_profile("sanitizer", max_examples=4, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_AVAILABLE = ["cpu"] + (["cuda"] if pyflowmap.has_cuda_kernels() else [])
# PYFLOWMAP_TEST_DEVICES=cuda restricts the matrix (e.g. to run only CUDA cases under compute-sanitizer)
DEVICES = [d for d in os.environ.get("PYFLOWMAP_TEST_DEVICES", ",".join(_AVAILABLE)).split(",") if d in _AVAILABLE]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"pyflowmap build: {pyflowmap.build_info()}"


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """The digits classifier evaluator, trained into a fresh cache (images tests)."""
    pytest.importorskip("sklearn")
    from pyflowmap.images.metrics import ImageEvaluator

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYFLOWMAP_CACHE", str(tmp_path_factory.mktemp("cache")))
        return ImageEvaluator("digits")


@pytest.fixture(scope="module")
def fm_teacher(tmp_path_factory):
    """A 150-step fm run on the digits: the distillation teacher of the images tests."""
    pytest.importorskip("sklearn")
    from pyflowmap.images.config import ImageConfig
    from pyflowmap.images.train import ImageTrainer
    from tests.helpers import DIGITS_TINY

    out = tmp_path_factory.mktemp("fm")
    ImageTrainer(ImageConfig(objective="fm", steps=150, **DIGITS_TINY), out_dir=out, progress=False).fit()
    return out
