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
#: before torch 2.13, inductor's CPU flex lowering rejects q/k/v sharing a buffer: attnswap
#: refuses flex inside a CPU graph there
FLEX_ON_CPU_IN_GRAPH = TORCH >= Version("2.13")

needs_flex_on_cpu = pytest.mark.skipif(not FLEX_ON_CPU, reason=f"flex_attention on CPU needs torch >= 2.6 ({TORCH})")


def assert_traced_with(stats, backend: str) -> None:
    """Every site of ``stats`` chose ``backend`` while tracing (on CPU). Where this torch cannot
    take it inside a graph, the site falls back to ``sdpa`` there, with the reason."""
    refused_because = None
    if backend.startswith("sdpa_") and not PINNED_KERNEL_IN_GRAPH:
        refused_because = "cannot trace sdpa_kernel"
    elif backend == "flex" and not FLEX_ON_CPU_IN_GRAPH:
        refused_because = "share a buffer"
    if refused_because:
        for site in stats:
            assert list(site.traced) == ["sdpa"], site
            reasons = [r for f in site.fallbacks for r in f.refused.get(backend, ())]
            assert reasons and all(refused_because in r for r in reasons), site.fallbacks
        return
    for site in stats:
        assert list(site.traced) == [backend], site


def _ci_pin(package: str) -> str | None:
    from pathlib import Path

    for line in (Path(__file__).parents[1] / "constraints-ci.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    return None


#: the timm CI tests against; an older one runs under ``TIMM=... bash .ci/compat``
CI_TIMM = _ci_pin("timm")


def unpatched_or_skip(compute):
    """``compute()`` (the unpatched model's output). With a timm other than CI's, a model that
    fails unpatched has nothing to compare with, so the test skips; with CI's timm it fails."""
    import timm

    try:
        return compute()
    except Exception as exc:
        if timm.__version__ == CI_TIMM:
            raise
        pytest.skip(f"the unpatched model fails with timm {timm.__version__}: {type(exc).__name__}: {exc}")


def skip_unless_in_timm(name: str) -> None:
    """Skip when the installed timm has no model ``name``: CI's has every one the tests use, an
    older timm (``TIMM=... bash .ci/compat``) may not."""
    import timm

    if name not in timm.list_models():
        pytest.skip(f"{name} is not in timm {timm.__version__}")
