from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


class SdpaCounter(TorchFunctionMode):
    """Counts calls of F.scaled_dot_product_attention that reach PyTorch (i.e. were not rerouted),
    and softmax calls (attention a module computed by hand), as torch sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.softmax = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        elif func in (F.softmax, torch.softmax, torch.Tensor.softmax) and isinstance(args[0], torch.Tensor):
            self.softmax += 1  # (a softmax of attnswap's deferred scores computes nothing: counted if they settle)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sdpa_counter():
    return SdpaCounter


@pytest.fixture(autouse=True)
def _quiet_attnswap_warnings():
    logging.getLogger("attnswap").setLevel(logging.ERROR)
    yield
    logging.getLogger("attnswap").setLevel(logging.NOTSET)


@pytest.fixture
def registered():
    """Register backends for one test and remove them afterwards."""
    import attnswap

    names: list[str] = []

    def register(name, fn=None, **kwargs):
        names.append(name)
        return attnswap.register_backend(name, fn, **kwargs)

    yield register
    for name in names:
        try:
            attnswap.unregister_backend(name)
        except attnswap.AttnSwapError:
            pass


def rand(*shape, dtype=torch.float64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, **kw)
