"""Models named on the command line: a timm model name (built locally, never downloaded) or
``package.module:attribute`` for the user's own (a module, or a function returning one)."""

from __future__ import annotations

import importlib
import re
from typing import Any, Sequence, Union

import torch

from .errors import AttnSwapError


def load_model(spec: str, **timm_kwargs) -> torch.nn.Module:
    """Build the model ``spec`` names, without downloading weights."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            found = importlib.import_module(module_name)
            for part in attr.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as exc:
            raise AttnSwapError(f"cannot load {spec!r}: {exc} (expected package.module:attribute)") from None
        model = found() if callable(found) and not isinstance(found, torch.nn.Module) else found
        if not isinstance(model, torch.nn.Module):
            raise AttnSwapError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        import timm
    except ImportError:
        raise AttnSwapError(f"{spec!r} looks like a timm model name, and timm is not installed: pip install timm") from None
    if not timm.is_model(spec):
        close = timm.list_models(f"*{spec}*")[:5]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise AttnSwapError(f"timm has no model named {spec!r}.{hint} Or pass package.module:attribute for your own.")
    return ungate(timm.create_model(spec, pretrained=False, **timm_kwargs))


#: parameters that multiply a residual branch or a normalized output (norm weights, layer
#: scales, gates): when timm initializes one to a constant (0 for zero-init BatchNorm in
#: LeViT/EfficientViT projections, 1e-5 or 1e-6 for CaiT/DeiT-III/EVA layer scales), the branch
#: barely reaches the output and any error in it is hidden from an output comparison
_GATE = re.compile(r"(^|\.)(weight|gamma(_\d)?|scale|layer_scale\w*)$")
#: relative-position tables timm initializes to zeros (SAM ViT, MViTv2, BEiT, LeViT's attention
#: biases): a zero bias would hide any error in how it is carried (attnswap.structure)
_ZERO_TABLE = re.compile(r"(^|\.)(rel_pos\w*|relative_position_bias_table|attention_biases)$")


def ungate(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every constant-initialized multiplicative parameter random values around 1, and every
    all-zero relative-position table small random values, so each attention branch and bias of a
    randomly initialized model really shows in its output (in place).

    Only for models with random weights (never applied to loaded weights): it makes output
    comparisons sensitive to each attention site, it changes no computation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and p.device.type != "meta" and _GATE.search(name):
                flat = p.detach().flatten()
                if bool((flat == flat[0]).all()):
                    p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
            elif p.is_floating_point() and p.numel() and p.device.type != "meta" and _ZERO_TABLE.search(name):
                if not bool(p.detach().any()):
                    p.copy_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


def example_input(
    model: torch.nn.Module, batch: int, img_size: int | None = None, shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random input: ``shape`` if given, else the model's ``pretrained_cfg`` input size (timm),
    with ``img_size`` replacing its spatial size."""
    if shape is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        if img_size:
            height = width = img_size
        shape = (batch, channels, height, width)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


#: a model's input: one tensor, positional arguments, or keyword arguments (transformers, diffusers)
Inputs = Union[torch.Tensor, tuple, dict]


def run_model(model: torch.nn.Module, x: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def cast_inputs(x: Any, dtype: torch.dtype) -> Any:
    """``x`` with its floating tensors in ``dtype`` (token ids, masks of ints and the rest stay)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: cast_inputs(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(cast_inputs(v, dtype) for v in x)
    return x


def input_dtype(x: Any) -> torch.dtype:
    """The dtype of the first floating tensor of ``x`` (float32 when it has none: token ids)."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.is_floating_point() else torch.float32
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return torch.float32


def input_shape(x: Inputs) -> tuple:
    """``x``'s shape; for several inputs, their shapes (by name for keyword inputs)."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    items = x.items() if isinstance(x, dict) else enumerate(x)
    return tuple((k, tuple(v.shape)) for k, v in items if isinstance(v, torch.Tensor))


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model's output (a tensor, a tuple, a dict or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def features(model: torch.nn.Module, x: Inputs) -> torch.Tensor:
    """What to compare: timm's ``forward_features`` (heads are often zero-initialized, which
    would hide any difference in the logits), else the model's output (its first tensor)."""
    forward = getattr(model, "forward_features", None)
    if callable(forward) and isinstance(x, torch.Tensor):
        out = forward(x)
        return out[-1] if isinstance(out, (list, tuple)) else out
    out = run_model(model, x)
    if isinstance(out, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in out):
        return out[-1]
    return first_tensor(out)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64; NaN anywhere is an infinite error."""
    diff = (out.double() - ref.double()).abs().nan_to_num(nan=float("inf"))
    return float(diff.max() / ref.double().abs().max().clamp_min(1e-30))


def check_runs(model: torch.nn.Module, x: Inputs, name: str) -> torch.Tensor:
    """``features(model, x)`` without grad, or an error that says the input does not fit."""
    try:
        with torch.no_grad():
            return features(model, x)
    except Exception as exc:  # noqa: BLE001 - any failure here is the input's or the model's
        raise AttnSwapError(
            f"the unpatched {name} fails on an input of shape {input_shape(x)}: {type(exc).__name__}: {exc} "
            "(pass --input-shape / --img-size to fit it)"
        ) from None


def naflex_batch(
    lengths: Sequence[int], n: int, grid_w: int = 24, patch_dim: int = 16 * 16 * 3, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A batch as timm's NaFlex collator makes it for ``naflexvit_*`` models: ``lengths[b]`` patches
    of sequence ``b`` (laid out ``grid_w`` per row), padded at the tail to ``n``; random pixels."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    coord = torch.zeros(batch, n, 2, dtype=torch.long)
    valid = torch.zeros(batch, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        idx = torch.arange(length)
        coord[b, :length, 0], coord[b, :length, 1] = idx // grid_w, idx % grid_w
        valid[b, :length] = True
    patches = torch.randn(batch, n, patch_dim, generator=g).to(dtype)
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}
