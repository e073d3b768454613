"""transformers models patched against unpatched, on the issue's targets: outputs in float32
(< 1e-5) and float64 (< 1e-12), greedy ``generate()`` tokens for every type with a causal or
sequence-to-sequence LM head, and ``torch.compile(fullgraph=True)`` where the unpatched model
compiles.

Every model type is built from the coverage sweep's small config (:mod:`attnswap.zoos.transformers_models`,
random weights, nothing downloaded) with the sweep's inputs (a padded first sequence, so masks
reach the kernel). Backend ``sdpa``: the model's own implementation is ``sdpa`` too, so the two
runs differ only by the route. ``generate``: 6 new tokens from a left-padded batch of two.
Compiling is slow on a CPU, so it runs only with ``--compile``, on the types matching its patterns.

    python benchmarks/transformers_parity.py [PATTERN ...] [--compile PATTERN ...] [--max-params 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import fnmatch
import platform
import signal
import time
from dataclasses import asdict, dataclass

import torch

import attnswap
from attnswap.coverage import _alarm, _as_double, _flat, relative_error
from attnswap.models import ungate
from attnswap.report import PATCHED
from attnswap.zoos import transformers_models as zoo

FLOAT32 = 1e-5
FLOAT64 = 1e-12
NEW_TOKENS = 6
ULP_MARGIN = 4


def _within(err: float, target: float, ulp: float | None) -> bool:
    # rounding amplified by the model itself: within a few times what one ulp at the sites does
    return err < target or (ulp is not None and err <= ULP_MARGIN * ulp)


@dataclass
class Parity:
    name: str
    sites: int = 0
    calls: int = 0
    f32: float | None = None
    f64: float | None = None
    f64_skipped: str = ""
    #: above the target: how much the unpatched model's output moves when every routed site's output
    #: is perturbed by one unit in the last place (a model that amplifies rounding, like VITS's flows)
    f32_ulp: float | None = None
    f64_ulp: float | None = None
    #: "same", "DIFFERENT", or why it was not run
    generate: str = ""
    #: "match", "MISMATCH", "FAILS" (patched does not compile), or why it was not run
    compiled: str = ""
    error: str = ""

    @property
    def _f32_ok(self) -> bool:
        return _within(self.f32, FLOAT32, self.f32_ulp)

    @property
    def _f64_ok(self) -> bool:
        return _within(self.f64, FLOAT64, self.f64_ulp)

    @property
    def ok(self) -> bool:
        return (
            not self.error and self.f32 is not None and self._f32_ok
            and (self._f64_ok if self.f64 is not None else bool(self.f64_skipped))
            and self.generate != "DIFFERENT" and self.compiled not in ("MISMATCH", "FAILS")
        )


def _run(model: torch.nn.Module, x: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        return _flat(model(**x))


def _model(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = ungate(zoo.build(name)).eval()
    x = zoo.example(model, name)  # chosen in float32: the sweep's example runs the model to choose
    if dtype == torch.float64:
        model, x = model.double(), _as_double(x)
    return model, x


def _outputs(p: Parity, name: str) -> None:
    for dtype in (torch.float32, torch.float64):
        model, x = _model(name, dtype)
        try:
            ref = _run(model, x)
        except Exception as exc:
            if dtype == torch.float32:
                raise
            # the model itself makes float32 tensors inside (DAB-DETR, FastSpeech2): nothing to compare
            p.f64_skipped = f"unpatched does not run in float64 ({type(exc).__name__})"
            return
        report = attnswap.patch(model, backend="sdpa")
        out = _run(model, x)
        err = relative_error(out, ref)
        sites = [site.path for site in report.sites if site.status == PATCHED]
        ulp = _ulp_sensitivity(name, sites, dtype) if err >= (FLOAT32 if dtype == torch.float32 else FLOAT64) else None
        if dtype == torch.float32:
            p.f32, p.f32_ulp = err, ulp
            p.sites = len(sites)
            p.calls = attnswap.stats(model).total_calls
        else:
            p.f64, p.f64_ulp = err, ulp


def _ulp_sensitivity(name: str, sites: list[str], dtype: torch.dtype) -> float:
    """The unpatched model with each of ``sites``' outputs scaled by 1 + eps (one unit in the last
    place of ``dtype``), against itself."""
    model, x = _model(name, dtype)
    ref = _run(model, x)
    scale = 1 + torch.finfo(dtype).eps

    def nudge(module, args, out):
        if isinstance(out, tuple):
            return (out[0] * scale, *out[1:])
        return out * scale

    hooks = [model.get_submodule(path).register_forward_hook(nudge) for path in sites]
    try:
        return relative_error(_run(model, x), ref)
    finally:
        for h in hooks:
            h.remove()


def _lm_class(name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForSeq2SeqLM
    return None


def _generate(p: Parity, name: str) -> None:
    auto = _lm_class(name)
    if auto is None:
        p.generate = "no LM head"
        return
    torch.manual_seed(0)
    model = ungate(auto.from_config(zoo.config_for(name))).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, zoo._VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    if not model.config.is_encoder_decoder:
        mask[0, :3] = 0  # left padding: the new tokens follow the prompt in both rows
    else:
        mask[0, -3:] = 0
    kwargs = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        num_beams=1, pad_token_id=0,
    )
    if model.config.is_encoder_decoder:
        kwargs["decoder_start_token_id"] = 1
    with torch.no_grad():
        ref = model.generate(**kwargs)
        attnswap.patch(model, backend="sdpa")
        out = model.generate(**kwargs)
    p.generate = "same" if torch.equal(out, ref) else "DIFFERENT"


def _compile(p: Parity, name: str) -> None:
    model, x = _model(name, torch.float32)
    ref = _run(model, x)
    torch._dynamo.reset()
    try:
        _run(torch.compile(model, fullgraph=True), x)
    except Exception as exc:
        p.compiled = f"unpatched does not compile ({type(exc).__name__})"
        return
    attnswap.patch(model, backend="sdpa")
    torch._dynamo.reset()
    try:
        out = _run(torch.compile(model, fullgraph=True), x)
    except Exception as exc:
        p.compiled = "FAILS"
        p.error = f"compile: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        return
    p.compiled = "match" if relative_error(out, ref) < FLOAT32 else "MISMATCH"


def check(name: str, *, compile_: bool = False, max_params_m: float = 30.0, timeout_s: int = 300) -> Parity:
    p = Parity(name)
    _alarm(timeout_s)  # the sweep's: a model that hangs raises, and is reported like any error
    try:
        meta = zoo.build(name, meta=True)
        params = sum(t.numel() for t in meta.parameters()) / 1e6
        if params > max_params_m:
            p.error = f"skipped: {params:.0f}M parameters"
            return p
        _outputs(p, name)
        if not p.calls:
            p.error = "skipped: no routed call"
            return p
        try:
            _generate(p, name)
        except Exception as exc:
            p.generate = f"not run ({type(exc).__name__}: {str(exc)[:60]})"
        if compile_:
            _compile(p, name)
        else:
            p.compiled = "not asked"
    except Exception as exc:
        p.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    finally:
        signal.alarm(0)
    return p


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1e}"


def main(argv: list[str] | None = None) -> list[Parity]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="model type globs (default: every type)")
    parser.add_argument("--compile", nargs="*", default=[], metavar="PATTERN",
                        help="also compile (fullgraph) the types matching these globs")
    parser.add_argument("--max-params", type=float, default=30.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import transformers

    start = time.perf_counter()
    rows = []
    for name in zoo.model_names(args.patterns):
        compile_ = any(fnmatch.fnmatchcase(name, pat) for pat in args.compile)
        rows.append(check(name, compile_=compile_, max_params_m=args.max_params))
    checked = [r for r in rows if r.f32 is not None and r.calls]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {platform.machine()} CPU, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| model | routed calls | float32 | float64 | generate | compile | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in checked:
        f32 = _fmt(r.f32) + (f" (one ulp at the sites: {_fmt(r.f32_ulp)})" if r.f32_ulp is not None else "")
        f64 = _fmt(r.f64) + (f" (one ulp at the sites: {_fmt(r.f64_ulp)})" if r.f64_ulp is not None else "")
        print(f"| {r.name} | {r.calls} | {f32} | {f64 or r.f64_skipped} | {r.generate} | {r.compiled} | "
              f"{'yes' if r.ok else 'NO ' + r.error} |")
    generated = [r for r in checked if r.generate in ("same", "DIFFERENT")]
    compiled = [r for r in checked if r.compiled in ("match", "MISMATCH", "FAILS")]
    print(
        f"\n{len(checked)} types run: {sum(r.f32 < FLOAT32 for r in checked)} float32 < {FLOAT32:g} "
        f"({sum(r.f32_ulp is not None and r._f32_ok for r in checked)} more within {ULP_MARGIN}x of one ulp at the "
        f"sites), "
        f"{sum(r.f64 is not None and r.f64 < FLOAT64 for r in checked)} float64 < {FLOAT64:g} "
        f"({sum(r.f64_ulp is not None and r._f64_ok for r in checked)} more within {ULP_MARGIN}x of one ulp at the "
        f"sites, amplified by the model; {sum(bool(r.f64_skipped) for r in checked)} do not run in float64 unpatched); "
        f"generate: {sum(r.generate == 'same' for r in generated)} of {len(generated)} the same tokens; "
        f"compile: {sum(r.compiled == 'match' for r in compiled)} of {len(compiled)} that compile unpatched match; "
        f"{sum(not r.ok for r in checked)} not ok"
    )
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
