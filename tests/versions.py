"""What the installed torch can do, by version: tests for features an older torch lacks skip
(or expect the documented refusal) there. `bash .ci/compat 2.5.1 0.20.1` runs the suite on the
oldest torch pyproject.toml allows."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

TORCH = Version(torch.__version__.split("+")[0])

#: flex_attention's CPU lowering arrived in torch 2.6; attnswap refuses flex on CPU before it
FLEX_ON_CPU = TORCH >= Version("2.6")
#: torch 2.6's dynamo traces ``sdpa_kernel``; on 2.5 a pinned SDPA kernel falls back inside a graph
PINNED_KERNEL_IN_GRAPH = TORCH >= Version("2.6")

needs_flex_on_cpu = pytest.mark.skipif(not FLEX_ON_CPU, reason=f"flex_attention on CPU needs torch >= 2.6 ({TORCH})")


def assert_traced_with(stats, backend: str) -> None:
    """Every site of ``stats`` chose ``backend`` while tracing; on a torch whose dynamo cannot
    trace ``sdpa_kernel``, a pinned SDPA backend falls back to ``sdpa`` there, with that reason."""
    if backend.startswith("sdpa_") and not PINNED_KERNEL_IN_GRAPH:
        for site in stats:
            assert list(site.traced) == ["sdpa"], site
            reasons = [r for f in site.fallbacks for r in f.refused.get(backend, ())]
            assert reasons and all("cannot trace sdpa_kernel" in r for r in reasons), site.fallbacks
        return
    for site in stats:
        assert list(site.traced) == [backend], site
