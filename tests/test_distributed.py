"""Distributed training: a patched model under DDP and FSDP2 (gloo, 2 CPU processes) gives the
gradients of one unpatched process on the full batch, whether it is patched before or after
wrapping, and its attention calls are really served by the chosen backend inside the wrapper.

Both ranks run tests/distributed_worker.py once per module (about 10 s: two fresh interpreters
import torch and timm); each scenario there writes its gradients and ``attnswap.stats`` to a file
that the tests below compare with this process's unpatched model. Everything is float64, so the
two half-batch gradients averaged by DDP's all-reduce (or FSDP2's reduce-scatter) match the
full-batch gradient to ~1e-15: the tolerance is tight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attnswap
from distributed_worker import BACKEND, SCENARIOS, UNAVAILABLE, full_batch, loss_of
from families import build, features

pytestmark = pytest.mark.slow

WORLD = 2
JOIN_TIMEOUT_S = 120
#: both test families are built with depth=2: one SDPA call per block per forward
CALLS = 2
#: observed: max |diff| 4e-17 (two ranks at 1 thread vs this process at its own thread count)
TIGHT = dict(rtol=1e-10, atol=1e-14)
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """Run both ranks once; scenario name -> [rank 0 result, rank 1 result]."""
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the workers import the very attnswap this process imported, and tests/ helpers
    src = str(Path(attnswap.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    logs = [tmp / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    try:
        for r in range(WORLD):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(TESTS / "distributed_worker.py"), str(r), str(WORLD), str(tmp / "store"), str(out)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp),
                ))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the distributed workers did not finish in {JOIN_TIMEOUT_S} s (killed):\n{_tails(logs)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    codes = [p.returncode for p in procs]
    if any(codes):
        pytest.fail(f"distributed workers exited with {codes}:\n{_tails(logs)}")
    results = {}
    for name in SCENARIOS:
        files = [out / f"{name}.rank{r}.pt" for r in range(WORLD)]
        if not all(f.exists() for f in files):
            pytest.fail(f"scenario {name} wrote no result:\n{_tails(logs)}")
        results[name] = [torch.load(f, weights_only=False) for f in files]
    return results


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name} ---\n{log.read_text()[-4000:]}" for log in logs)


@pytest.fixture(scope="module")
def reference():
    """Gradients of one unpatched process on the full batch, per family."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def grads(family: str) -> dict[str, torch.Tensor]:
        if family not in cache:
            model, _ = build(family, torch.float64)
            loss_of(features(model, full_batch(family))).backward()
            cache[family] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return cache[family]

    return grads


def ranks(worker_results, name: str) -> list[dict]:
    """Both ranks' results; skips when FSDP2/DTensor cannot run here, fails on any other error."""
    results = worker_results[name]
    for rank, r in enumerate(results):
        if r["error"] and r["error"].startswith(UNAVAILABLE):
            pytest.skip(r["error"])
        if r["error"]:
            pytest.fail(f"{name} raised on rank {rank}:\n{r['error']}")
    return results


def assert_grads_match(grads: dict, ref: dict, family: str, rank: int) -> None:
    assert grads.keys() == ref.keys(), f"rank {rank}: gradients for other parameters than the reference"
    if family == "beit":
        assert any("relative_position_bias_table" in n for n in grads), "must cover a learnable bias table"
    for n, g in grads.items():
        assert type(g) is torch.Tensor and g.dtype == torch.float64
        torch.testing.assert_close(g, ref[n], **TIGHT, msg=lambda m: f"rank {rank}, {n}: {m}")


def assert_routed(stats: dict, rank: int) -> None:
    assert stats["by_backend"] == {BACKEND: CALLS}, f"rank {rank}: {stats}"
    assert stats["fallback_calls"] == 0


def sites(prefix: str = "") -> list[str]:
    return [f"{prefix}blocks.{i}.attn" for i in range(CALLS)]


# -- DDP --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "beit"])
def test_ddp_patched_before_wrapping_matches_one_unpatched_process(family, worker_results, reference):
    results = ranks(worker_results, f"ddp_patch_before[{family}]")
    for rank, r in enumerate(results):
        assert r["patched"] == sites()
        assert_routed(r["stats"], rank)  # attnswap.stats(ddp_model) sees through the wrapper
        assert_routed(r["model_stats"], rank)
        assert r["query_types"] == ["Tensor"]
        assert_grads_match(r["grads"], reference(family), family, rank)
    # DDP's all-reduce leaves the very same bits on both ranks
    assert all(torch.equal(g, results[1]["grads"][n]) for n, g in results[0]["grads"].items())


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_ddp_patching_the_ddp_wrapper_after_a_training_step(family, worker_results, reference):
    """attnswap.patch(ddp_model) after DDP built its reducer and ran one (unpatched) step."""
    for rank, r in enumerate(ranks(worker_results, f"ddp_patch_after_wrapper[{family}]")):
        assert r["patched"] == sites("module.model.")
        assert r["stats"]["sites"] == sites("module.model.")
        assert_routed(r["stats"], rank)
        assert_routed(r["model_stats"], rank)
        assert_grads_match(r["grads"], reference(family), family, rank)
        assert r["unpatched"] == CALLS and r["still_patched"] is False


def test_ddp_patching_ddp_module_after_wrapping(worker_results, reference):
    for rank, r in enumerate(ranks(worker_results, "ddp_patch_after_module[vit]")):
        assert r["patched"] == sites("model.")
        assert r["stats"]["sites"] == sites("module.model.")
        assert_routed(r["stats"], rank)
        assert_grads_match(r["grads"], reference("vit"), "vit", rank)
        assert r["unpatched"] == CALLS and r["still_patched"] is False


# -- FSDP2 (fully_shard) ----------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("family", ["vit", "beit"])
def test_fsdp2_sharding_blocks_matches_one_unpatched_process(family, order, worker_results, reference):
    """fully_shard on every block and the root, patched before or after sharding.

    Parameters and gradients are sharded DTensors; FSDP2 all-gathers them into plain tensors
    for the forward, so q/k/v reach the router as plain tensors (its fast path)."""
    for rank, r in enumerate(ranks(worker_results, f"fsdp2_blocks_patch_{order}[{family}]")):
        assert r["patched"] == sites("model." if order == "after" else "")
        assert (r["param_type"], r["grad_type"]) == ("DTensor", "DTensor")
        assert r["query_types"] == ["Tensor"]
        assert_routed(r["stats"], rank)
        assert_grads_match(r["grads"], reference(family), family, rank)


def test_fsdp2_sharding_attention_modules_patched_before(worker_results, reference):
    """fully_shard on the attention modules themselves re-classes them (FSDP<Attention>, a
    subclass of the patched class): the routing survives and the gradients match."""
    for rank, r in enumerate(ranks(worker_results, "fsdp2_attn_patch_before[vit]")):
        assert r["attn_class_module"].startswith("torch.distributed.fsdp")
        assert r["patched"] == sites()
        assert_routed(r["stats"], rank)
        assert_grads_match(r["grads"], reference("vit"), "vit", rank)


def test_fsdp2_patching_after_sharding_attention_modules_routes_or_refuses(worker_results):
    for rank, r in enumerate(worker_results["fsdp2_attn_patch_after[vit]"]):
        if r["error"] and r["error"].startswith(UNAVAILABLE):
            pytest.skip(r["error"])
        assert r["error"] is None, r["error"]
        assert r["patched"] == sites("model."), f"rank {rank}: patch() routed {r['patched']}"
        assert_routed(r["stats"], rank)


def test_fsdp2_switching_backend_after_sharding_patched_attention_modules(worker_results):
    for rank, r in enumerate(ranks(worker_results, "fsdp2_attn_patch_before[vit]")):
        assert r["switch_error"] is None, r["switch_error"]
        assert r["switch_patched"] == sites("model."), f"rank {rank}: switching routed {r['switch_patched']}"
        assert r["switch_stats"]["by_backend"] == {"sdpa_math": CALLS}, f"rank {rank}: {r['switch_stats']}"


def test_fsdp2_unpatch_after_sharding_patched_attention_modules_restores_exactly(worker_results):
    for rank, r in enumerate(ranks(worker_results, "fsdp2_attn_patch_before[vit]")):
        assert r["unpatch_error"] is None, r["unpatch_error"]
        assert r["unpatched"] == CALLS
        assert r["generated_class_left"] == [], f"rank {rank}: still generated classes at {r['generated_class_left']}"
        assert r["repatched"] == sites("model."), f"rank {rank}: patching again routed {r['repatched']}"


# -- DTensor activations (the router's tensor-subclass path) -------------------------------------

def test_dtensor_activations_route_through_the_subclass_path(worker_results):
    """distribute_module (replicated DTensor parameters) and a DTensor input: q/k/v are DTensors,
    the router serves them with the chosen backend, and the gradients match the unpatched model's
    under the same DTensor run."""
    for rank, r in enumerate(ranks(worker_results, "dtensor_activations[vit]")):
        assert r["query_types"] == ["DTensor"] and r["out_type"] == "DTensor"
        assert r["patched"] == sites()
        assert_routed(r["stats"], rank)
        assert_grads_match(r["grads"], r["unpatched_grads"], "vit", rank)
