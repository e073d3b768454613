"""One rank of tests/test_distributed.py: ``python distributed_worker.py RANK WORLD STORE OUT``.

Joins a gloo process group through a FileStore, runs every scenario in SCENARIOS in order (all
ranks run the same ones, so their collectives pair up) and writes one ``OUT/<scenario>.rank<R>.pt``
per scenario: the full gradient of every parameter of the timm model after one backward on this
rank's half of :func:`full_batch`, the patched model's ``attnswap.stats``, the Python type of every
query that reached a router, and the traceback if the scenario raised. The test compares these
with an unpatched single process on the full batch.
"""

from __future__ import annotations

import datetime
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attnswap  # noqa: E402
from attnswap.report import PATCHED  # noqa: E402
from attnswap.routing import ROUTE_METHOD, Router  # noqa: E402
from families import build, features  # noqa: E402

BACKEND = "eager"
PG_TIMEOUT = datetime.timedelta(seconds=60)


def full_batch(family: str) -> torch.Tensor:
    """The batch the single process sees whole and the two ranks see half of each (4 images, float64)."""
    _, x = build(family, torch.float64)
    return torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    # a mean over the batch: the full-batch gradient is the average of the two half-batch
    # gradients, which is what DDP's all-reduce and FSDP's reduce-scatter compute
    return out.square().mean()


class Features(torch.nn.Module):
    """Calls the model's features through ``__call__`` so DDP / FSDP2 root hooks run."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return features(self.model, x)


# -- instrumentation: which tensor type reached the router (the plain fast path or the subclass path)

QUERY_TYPES: list[str] = []


def _record_query_types() -> None:
    """Wrap the router's entry point in this worker process only (never in the test process)."""
    route = getattr(Router, ROUTE_METHOD)

    def recording_route(self, query, *args, **kwargs):
        QUERY_TYPES.append(type(query).__name__)
        return route(self, query, *args, **kwargs)

    setattr(Router, ROUTE_METHOD, recording_route)


# -- helpers -------------------------------------------------------------------------------------

def _my_half(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _local_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Sharded DTensor gradients gathered whole (a collective: every rank calls it in the same order)."""
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            out[n] = p.grad.full_tensor().detach().clone()
    return out


def _stats(target: torch.nn.Module) -> dict:
    s = attnswap.stats(target)
    return {
        "by_backend": s.by_backend(),
        "total_calls": s.total_calls,
        "fallback_calls": s.fallback_calls,
        "sites": [site.path for site in s],
    }


def _patched_paths(report) -> list[str]:
    return [s.path for s in report.sites if s.status == PATCHED]


# -- scenarios -------------------------------------------------------------------------------------

def ddp_patch_before(family, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = build(family, torch.float64)
    report = attnswap.patch(model, backend=BACKEND)
    ddp = DDP(Features(model), find_unused_parameters=True)  # the classifier head is not in the loss
    QUERY_TYPES.clear()
    loss_of(ddp(_my_half(full_batch(family), rank, world))).backward()
    return {
        "grads": _local_grads(model), "stats": _stats(ddp), "model_stats": _stats(model),
        "query_types": sorted(set(QUERY_TYPES)), "patched": _patched_paths(report),
    }


def _ddp_patch_after(family, rank, world, target):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = build(family, torch.float64)
    ddp = DDP(Features(model), find_unused_parameters=True)
    x = _my_half(full_batch(family), rank, world)
    # one unpatched training step first: DDP has built its reducer and buckets before the patch
    loss_of(ddp(x)).backward()
    for p in ddp.parameters():
        p.grad = None
    report = attnswap.patch(ddp if target == "wrapper" else ddp.module, backend=BACKEND)
    QUERY_TYPES.clear()
    loss_of(ddp(x)).backward()
    out = {
        "grads": _local_grads(model), "stats": _stats(ddp), "model_stats": _stats(model),
        "query_types": sorted(set(QUERY_TYPES)), "patched": _patched_paths(report),
    }
    out["unpatched"] = attnswap.unpatch(ddp)
    out["still_patched"] = attnswap.is_patched(ddp)
    return out


def ddp_patch_after_wrapper(family, rank, world):
    return _ddp_patch_after(family, rank, world, "wrapper")


def ddp_patch_after_module(family, rank, world):
    return _ddp_patch_after(family, rank, world, "module")


def _fsdp(family, rank, world, *, order, shard):
    fully_shard, mesh = _fsdp_setup()
    model, _ = build(family, torch.float64)
    report = attnswap.patch(model, backend=BACKEND) if order == "before" else None
    root = Features(model)
    for block in model.blocks:
        fully_shard(block if shard == "blocks" else block.attn, mesh=mesh)
    fully_shard(root, mesh=mesh)
    if order == "after":
        report = attnswap.patch(root, backend=BACKEND)
    QUERY_TYPES.clear()
    loss_of(root(_my_half(full_batch(family), rank, world))).backward()
    w = model.blocks[0].attn.qkv.weight
    out = {
        "grads": _full_grads(model), "stats": _stats(root), "query_types": sorted(set(QUERY_TYPES)),
        "patched": _patched_paths(report), "param_type": type(w).__name__, "grad_type": type(w.grad).__name__,
        "attn_class_module": type(model.blocks[0].attn).__module__,
    }
    if shard == "attn" and order == "before":
        out.update(_after_reclassing(root, _my_half(full_batch(family), rank, world)))
    return out


def _after_reclassing(root, x) -> dict:
    """Switch the backend, unpatch and patch again once FSDP2 re-classed the patched sites.

    Each step's exception is recorded (a clear refusal is an acceptable outcome), not raised."""
    out: dict = {}
    attnswap.stats(root, reset=True)
    try:
        out["switch_patched"] = _patched_paths(attnswap.patch(root, backend="sdpa_math"))
        with torch.no_grad():
            root(x)
        out["switch_stats"] = _stats(root)
        out["switch_error"] = None
    except Exception:  # noqa: BLE001
        out["switch_error"] = traceback.format_exc()
    try:
        out["unpatched"] = attnswap.unpatch(root)
        out["generated_class_left"] = [
            n for n, m in root.named_modules()
            if any("_attnswap_original_class" in k.__dict__ for k in type(m).__mro__)
        ]
        out["repatched"] = _patched_paths(attnswap.patch(root, backend=BACKEND))
        out["unpatch_error"] = None
    except Exception:  # noqa: BLE001
        out["unpatch_error"] = traceback.format_exc()
    return out


def fsdp2_blocks_patch_before(family, rank, world):
    return _fsdp(family, rank, world, order="before", shard="blocks")


def fsdp2_blocks_patch_after(family, rank, world):
    return _fsdp(family, rank, world, order="after", shard="blocks")


def fsdp2_attn_patch_before(family, rank, world):
    return _fsdp(family, rank, world, order="before", shard="attn")


def fsdp2_attn_patch_after(family, rank, world):
    return _fsdp(family, rank, world, order="after", shard="attn")


def dtensor_activations(family, rank, world):
    """Every parameter and the input a replicated DTensor: q/k/v reach the router as DTensors.

    Replicated means every rank holds the same data: each computes the full batch."""
    from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor

    mesh = _cpu_mesh()

    def grads_of(model):
        distribute_module(model, mesh)
        out = features(model, distribute_tensor(full_batch(family), mesh, [Replicate()]))
        loss_of(out).backward()
        return _full_grads(model), out

    # The reference is the unpatched model under the same DTensor run: torch 2.11 returns world-size
    # times the single-process gradient for replicated parameters (2.14 does not), patched or not.
    # Its own math path, because torch 2.11 has no DTensor rule for CPU SDPA.
    unpatched, _ = build(family, torch.float64)
    for module in unpatched.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    try:
        unpatched_grads, _ = grads_of(unpatched)
    except Exception as exc:  # noqa: BLE001 - nothing to compare with: the test skips with this
        raise Unavailable(f"the unpatched model does not run under DTensor here: {type(exc).__name__}: {exc}") from exc

    model, _ = build(family, torch.float64)
    report = attnswap.patch(model, backend=BACKEND)
    QUERY_TYPES.clear()
    grads, out = grads_of(model)
    return {
        "grads": grads, "unpatched_grads": unpatched_grads, "stats": _stats(model),
        "query_types": sorted(set(QUERY_TYPES)), "patched": _patched_paths(report), "out_type": type(out).__name__,
    }


class Unavailable(Exception):
    """This torch cannot run the scenario even without attnswap: the test skips with the reason."""


_FSDP: tuple | None = None
_MESH = None


def _cpu_mesh():
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        _MESH = init_device_mesh("cpu", (dist.get_world_size(),))
    return _MESH


def _fsdp_setup():
    global _FSDP
    if _FSDP is None:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        mesh = _cpu_mesh()
        # one step of a sharded Linear: torch 2.5's FSDP2 builds but needs CUDA streams to run
        probe = fully_shard(torch.nn.Linear(4, 4), mesh=mesh)
        probe(torch.ones(2, 4)).sum().backward()
        _FSDP = (fully_shard, mesh)
    return _FSDP


#: scenario name -> (function, family); the test module parametrizes over the same names
SCENARIOS = {
    f"{fn.__name__}[{family}]": (fn, family)
    for fn, families in [
        (ddp_patch_before, ("vit", "beit")),
        (ddp_patch_after_wrapper, ("vit", "beit")),
        (ddp_patch_after_module, ("vit",)),
        (fsdp2_blocks_patch_before, ("vit", "beit")),
        (fsdp2_blocks_patch_after, ("vit", "beit")),
        (fsdp2_attn_patch_before, ("vit",)),
        (fsdp2_attn_patch_after, ("vit",)),
        (dtensor_activations, ("vit",)),
    ]
    for family in families
}

#: what "FSDP2 does not run here" looks like: the test skips with the recorded reason
UNAVAILABLE = "unavailable: "


def main(rank: int, world: int, store_path: str, out_dir: str) -> int:
    import logging

    logging.getLogger("attnswap").setLevel(logging.ERROR)
    _record_query_types()
    torch.set_num_threads(1)  # two ranks on two cores
    torch.use_deterministic_algorithms(True)
    out = Path(out_dir)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world, timeout=PG_TIMEOUT
    )
    try:
        fsdp_unavailable = None
        try:
            _fsdp_setup()
        except Exception as exc:  # noqa: BLE001 - recorded for the test to skip with
            fsdp_unavailable = f"{UNAVAILABLE}FSDP2 fully_shard / a CPU DeviceMesh: {type(exc).__name__}: {exc}"
        for name, (fn, family) in SCENARIOS.items():
            if fsdp_unavailable and name.startswith("fsdp2"):
                result = {"error": fsdp_unavailable}
            else:
                try:
                    result = fn(family, rank, world)
                    result["error"] = None
                except Unavailable as exc:
                    result = {"error": f"{UNAVAILABLE}{exc}"}
                except Exception:  # noqa: BLE001 - the test reports it
                    result = {"error": traceback.format_exc()}
            torch.save(result, out / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
