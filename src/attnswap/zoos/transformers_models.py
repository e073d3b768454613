"""transformers, for the coverage sweep: every model type ``AutoModel`` knows, built from a small
config with random weights (nothing is downloaded).

A model type's default config is shrunk by setting the size attributes it has (hidden size,
layers, heads, key/value heads for GQA, vocabulary, image size, ...) to small values, in its
sub-configs too; a type whose config does not take them, or whose model cannot be built or run
from that, is reported as an error by the sweep. Inputs follow the model's ``main_input_name``:
token ids with a padded first sequence (so masks reach the kernel), pixels, or audio features.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Sequence

import torch

from . import Zoo

#: the small sizes set on every config (and sub-config) that has the attribute
TINY: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 37, "head_dim": 8, "vocab_size": 99, "max_position_embeddings": 64,
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
    "d_kv": 8, "d_ff": 37, "ffn_dim": 37, "embed_dim": 32, "n_embd": 32, "n_layer": 2, "n_head": 4,
    "image_size": 32, "patch_size": 8, "num_mel_bins": 8, "max_source_positions": 16,
    # mixture-of-experts and latent-attention sizes
    "moe_intermediate_size": 16, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    # the rotated part of each head (GPT-J, CodeGen) and video clips
    "rotary_dim": 4, "num_frames": 2, "projection_size": 32,
}
#: hierarchical models (Swin, CvT, DiNAT) size each stage in a list: one block per stage, heads doubling to 8
_STAGES = {"depths": lambda n: [1] * n, "num_heads": lambda n: [2 ** min(i, 3) for i in range(n)]}
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder_config", "decoder_config")
_VOCAB = 99


def model_names(patterns: Sequence[str] = ()) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = sorted(MODEL_MAPPING_NAMES)
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def _set(config: Any, key: str, value: Any) -> None:
    before = getattr(config, key, None)
    try:
        setattr(config, key, value)
    except Exception:  # a read-only or validated attribute: keep it (a strict field may be set before it is validated)
        try:
            object.__setattr__(config, key, before)
        except Exception:
            pass


def _shrink(config: Any) -> Any:
    for key, value in TINY.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, tuple, dict)):
            _set(config, key, value)
    for key, per_stage in _STAGES.items():
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
            _set(config, key, type(value)(per_stage(len(value))))
    depths, window, patch = (getattr(config, k, None) for k in ("depths", "window_size", "patch_size"))
    if isinstance(depths, (list, tuple)) and type(window) is int and type(patch) is int:
        # windowed stages (Swin): 2x2 windows, and an image whose last stage is one window
        _set(config, "window_size", 2)
        _set(config, "image_size", patch * 2 * 2 ** (len(depths) - 1))
    if hasattr(config, "kv_lora_rank"):
        # latent attention (DeepSeek-V2/V3 and their kin): every head has its own keys, and the
        # rotary embedding is sized by head_dim
        _set(config, "num_key_value_heads", config.num_attention_heads)
        if hasattr(config, "qk_rope_head_dim") and hasattr(config, "head_dim"):
            _set(config, "head_dim", config.qk_rope_head_dim)
        if hasattr(config, "qk_head_dim") and hasattr(config, "qk_nope_head_dim"):  # derived when built
            _set(config, "qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        # multimodal rotary embeddings (Qwen2-VL, GLM-4V) split the rotated half-head in three
        # sections, by default sized for a 128-wide head; other models ignore the key
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
        half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        if half and "mrope_section" not in rope:
            rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    if hasattr(config, "_experts_implementation_internal"):
        # the grouped-matmul experts kernel needs 16-byte strides, which tiny widths do not have on a CPU
        _set(config, "_experts_implementation_internal", "eager")
    # special tokens of the full vocabulary would not fit the small one
    for key, value in list(vars(config).items()):
        if key.endswith("_token_id") and isinstance(value, int) and value >= _VOCAB:
            _set(config, key, 1)
        elif key.endswith(("_tokens", "_token_ids")) and isinstance(value, list) and value and isinstance(value[0], int):
            _set(config, key, [t for t in value if t < _VOCAB])
    return config


def _shrink_all(config: Any) -> None:
    """``config`` and its text, vision, audio, encoder and decoder configs, at any depth (a dual
    encoder's vision config can be a whole CLIP config with its own vision config). Backbone
    configs keep their sizes: their stages are sized together, in lists."""
    _shrink(config)
    for sub in _SUB_CONFIGS:
        try:
            inner = getattr(config, sub, None)
        except Exception:  # a property that builds the sub-config and validates it against the shrunk sizes
            continue
        if inner is not None and inner is not config and hasattr(inner, "to_dict"):
            _shrink_all(inner)


def config_for(name: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[name]()
    _shrink_all(config)
    return config


def build(name: str, *, meta: bool = False) -> torch.nn.Module:
    from transformers import AutoModel

    if meta:  # a config the shrinking missed can describe billions of parameters
        with torch.device("meta"):
            return AutoModel.from_config(config_for(name))
    return AutoModel.from_config(config_for(name))


def _pixels(config: Any, g: torch.Generator, batch: int = 2) -> torch.Tensor:
    """Images at the config's size, or clips of ``num_frames`` images where it has them (video models)."""
    size = getattr(config, "image_size", 32)
    size = size if isinstance(size, int) else size[0]
    channels = getattr(config, "num_channels", 3)
    frames = getattr(config, "num_frames", None)
    shape = (batch, frames, channels, size, size) if isinstance(frames, int) else (batch, channels, size, size)
    return torch.randn(shape, generator=g)


def _first_that_runs(model: torch.nn.Module, candidates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first input set the unpatched model runs on (the last one whatever happens, so its
    error is the one the sweep reports): dual encoders need text and images, while a
    vision-language model given images without image tokens refuses them."""
    for x in candidates[:-1]:
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                model(**x)
            return x
        except Exception:
            continue
    return candidates[-1]


def example(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    params = inspect.signature(model.forward).parameters
    config = model.config
    if main == "input_ids":
        ids = torch.randint(3, _VOCAB, (2, 8), generator=g)
        x = {"input_ids": ids}
        if "attention_mask" in params:
            mask = torch.ones_like(ids)
            mask[0, -3:] = 0  # a padded first sequence: the mask has to reach the kernel
            x["attention_mask"] = mask
        if "decoder_input_ids" in params:
            x["decoder_input_ids"] = torch.randint(3, _VOCAB, (2, 5), generator=g)
        if "pixel_values" in params:  # text and images (CLIP, SigLIP, OWL-ViT, ViLT, ...), else text alone
            vision = getattr(config, "vision_config", None) or config
            return _first_that_runs(model, [{**x, "pixel_values": _pixels(vision, g)}, x])
        return x
    if main == "pixel_values":
        return {"pixel_values": _pixels(config, g)}
    if main == "input_features":  # log-mel frames, as many as the encoder's positions take
        frames = 2 * getattr(config, "max_source_positions", 16)
        x = {"input_features": torch.randn(2, getattr(config, "num_mel_bins", 8), frames, generator=g)}
        if "decoder_input_ids" in params:
            x["decoder_input_ids"] = torch.randint(3, _VOCAB, (2, 5), generator=g)
        return x
    if main == "input_values":  # raw audio
        return {"input_values": torch.randn(2, 1600, generator=g)}
    raise NotImplementedError(f"the sweep does not build {main!r} inputs for {name}")


def outputs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> object:
    return model(**x)


def version() -> str:
    import transformers

    return transformers.__version__


ZOO = Zoo("transformers", model_names, build, example, outputs, version)
