"""Tiny transformers models (random weights, CPU-sized) and their inputs, for the integration tests."""

from __future__ import annotations

from typing import Any, Callable

import torch

transformers = __import__("pytest").importorskip("transformers")


def _text(batch: int = 2, length: int = 7, vocab: int = 99, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, -3:] = 0  # padding: the mask must reach the kernel
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}


T = transformers
#: name -> (model built from a tiny config, its inputs)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]]]] = {
    "vit": (
        lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                       image_size=32, patch_size=8)),
        _pixels,
    ),
    "dinov2": (
        lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                             image_size=32, patch_size=8)),
        _pixels,
    ),
    "swin": (
        lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                                         window_size=4)),
        _pixels,
    ),
    "bert": (
        lambda: T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37)),
        _text,
    ),
    "llama": (  # GQA: 4 query heads share 2 key/value heads
        lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=37)),
        _text,
    ),
    "t5": (  # relative-position bias passed to the implementation as position_bias
        lambda: T.T5Model(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     decoder_start_token_id=0)),
        lambda: {**_text(), "decoder_input_ids": _text(length=5, pad=False)["input_ids"]},
    ),
    "clip": (  # separate text (causal) and vision configs
        lambda: T.CLIPModel(T.CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=16),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                               image_size=32, patch_size=8),
        )),
        lambda: {**_text(), **_pixels()},
    ),
    "siglip_vision": (
        lambda: T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=37, image_size=32, patch_size=8)),
        _pixels,
    ),
    "whisper": (
        lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
            max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
            eos_token_id=2, bos_token_id=1,
        )),
        lambda: {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3)),
                 "decoder_input_ids": _text(length=5, pad=False)["input_ids"]},
    ),
}


def _gemma2(**extra: Any) -> torch.nn.Module:
    # alternating sliding-window and full layers, GQA; transformers configures Gemma 2 for eager
    return T.Gemma2ForCausalLM(T.Gemma2Config(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=37, sliding_window=4, pad_token_id=0, **extra,
    ))


#: models transformers configures for ``eager`` (``_supports_sdpa = False``), reached through their own
#: eager function: name -> (model, inputs)
EAGER_MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]]]] = {
    "splinter": (  # an encoder with padding: the additive float mask eager gets
        lambda: T.SplinterModel(T.SplinterConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=37, question_token_id=5)),
        _text,
    ),
    "gemma2": (lambda: _gemma2(attn_logit_softcapping=None), _text),
    "speech_to_text": (  # an encoder-decoder, eager function without the float32 softmax
        lambda: T.Speech2TextModel(T.Speech2TextConfig(
            vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, input_feat_per_channel=8,
            input_channels=1, conv_channels=16, num_conv_layers=2, max_source_positions=64, max_target_positions=32,
        )),
        lambda: {"input_features": torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3)),
                 "decoder_input_ids": _text(length=5, pad=False)["input_ids"]},
    ),
}
#: eager models whose calls one SDPA call cannot express: name -> (model, inputs, the reason counted)
EAGER_NOT_EXPRESSIBLE: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]], str]] = {
    "gemma2_softcap": (lambda: _gemma2(attn_logit_softcapping=50.0), _text, "scores passed to tanh"),
    "gpt_oss": (  # attention sinks: a per-head logit concatenated to the scores
        lambda: T.GptOssModel(T.GptOssConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=37, num_local_experts=4, num_experts_per_tok=2,
            experts_implementation="eager",
        )),
        _text,
        "scores passed to cat",
    ),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    make, inputs = {**MODELS, **EAGER_MODELS, **{k: v[:2] for k, v in EAGER_NOT_EXPRESSIBLE.items()}}[name]
    torch.manual_seed(0)
    model = make().eval().to(dtype)
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs().items()}
    return model, x
