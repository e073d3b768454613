"""Key padding (NaFlexViT): a batch of mixed sequence lengths, masked SDPA vs per-sequence calls.

A NaFlex batch pads every sequence to the longest and masks the padding with an additive
``[B, 1, L, L]`` mask (``finfo.min``). attnswap carries the mask as the tokens' validity and runs
each sequence on its valid tokens only. Two measurements, variants interleaved, medians:

- one attention call as naflexvit_base makes it (12 heads, head dim 64): timm's masked SDPA
  (mask built once, as timm does per forward) vs the router with the validity;
- the whole model: naflexvit_base_patch16_gap (random weights) on the same batch, unpatched vs
  ``patch(backend="sdpa")``; every output row compared (padded rows included). ``--model
  gemma4_vit_167m`` measures Gemma 4 ViT instead, whose encoder masks padded keys only.

    python benchmarks/key_padding.py [--lengths 577,256,144,64,400,100,49,16] [--repeats 7] [--model NAME]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import timm
import torch

import attnswap
from attnswap.models import naflex_batch
from attnswap.routing import Policy, Router


def timed(variants: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="577,256,144,64,400,100,49,16", help="valid tokens per sequence (prefix included)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="naflexvit_base_patch16_gap", help="the whole-model measurement (or gemma4_vit_167m)")
    ap.add_argument("--skip-call", action="store_true", help="only the whole model")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    n = max(lengths)
    padding = 1 - sum(lengths) / (n * len(lengths))
    print(f"batch {len(lengths)}, lengths {lengths} (padded to {n}, {padding:.0%} padding), float32, "
          f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, {datetime.date.today()}")

    if not args.skip_call:
        # one call
        from attnswap.structure.timm import _naflex_padding
        from timm.models.naflexvit import create_attention_mask

        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(len(lengths), 12, n, 64, generator=g) for _ in range(3))
        valid = torch.zeros(len(lengths), n, dtype=torch.bool)
        for b, length in enumerate(lengths):
            valid[b, :length] = True
        structured = _naflex_padding(create_attention_mask)
        router = Router(Policy("sdpa", (), True), site="bench")
        with torch.no_grad():
            mask = create_attention_mask(valid)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = router.route(q, k, v, attn_mask=structured(valid))
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            one = timed(
                {
                    "timm: build mask + masked SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=create_attention_mask(valid)),
                    "masked SDPA (mask built beforehand)": lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask),
                    "attnswap sdpa, per sequence": lambda: router.route(q, k, v, attn_mask=structured(valid)),
                    "SDPA without mask (floor: no padding skipped)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                },
                args.repeats,
            )
        base = one["masked SDPA (mask built beforehand)"]
        print(f"\none attention call, q/k/v {tuple(q.shape)}; every row vs masked SDPA: rel. error {err:.1e}")
        print("| variant | ms (median) | speed-up vs masked SDPA |")
        print("|---|---|---|")
        for name, t in one.items():
            print(f"| {name} | {t * 1e3:.1f} | {base / t:.2f}x |")

    # the whole model
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = naflex_batch(lengths, n)

    def features():
        out = model.forward_features(x) if args.model.startswith("gemma4") else model.forward_features(**x)
        return out["patches"] if isinstance(out, dict) else out

    with torch.no_grad():
        ref = features()
        attnswap.patch(model, backend="sdpa", strict=True)
        out = features()
        forms = attnswap.stats(model).structures()
        attnswap.unpatch(model)
    err = ((out - ref).abs().max() / ref.abs().max()).item()

    def run(patched: bool):
        def fn():
            if patched:
                attnswap.patch(model, backend="sdpa", strict=True)
            try:
                with torch.no_grad():
                    features()
            finally:
                attnswap.unpatch(model)
        return fn

    whole = timed({"unpatched": run(False), "patch(backend='sdpa')": run(True)}, args.repeats)
    print(f"\n{args.model} forward_features; every token's features vs unpatched: rel. error {err:.1e}; "
          f"{', '.join(f'{k}: {v} calls' for k, v in forms.items())}")
    print("| variant | s (median) | speed-up |")
    print("|---|---|---|")
    for name, t in whole.items():
        print(f"| {name} | {t:.3f} | {whole['unpatched'] / t:.2f}x |")


if __name__ == "__main__":
    main()
