"""Tiny checkpoints of one random model in every format the loaders read.

The writers transcribe grok1-spec.md §3 on their own (names, file order, orientation) rather than
reusing the loaders' tables, so that a mistake in those tables makes the loading tests fail.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file

from grokserve.model import GrokConfig, GrokModel
from grokserve.model.checkpoint import save_pretrained
from grokserve.model.quantization import QuantizedWeight

# 12 layers so that the release's lexicographic file order (0, 1, 10, 11, 2, ...) differs from numeric.
TWELVE_LAYERS = GrokConfig(
    vocab_size=64,
    emb_size=16,
    num_layers=12,
    num_q_heads=4,
    num_kv_heads=2,
    key_size=4,
    widening_factor=3,  # F = 32, and 32 · 3/2 / 16 gives back 3 from a Hugging Face config
    num_experts=4,
    num_selected_experts=2,
    attn_output_multiplier=0.5,
    embedding_multiplier_scale=4.0,
    output_multiplier_scale=1 / math.sqrt(3),
    sequence_len=64,
)


@dataclass
class QuantizedWeight8bit:
    """The reference's 8-bit weight class; the release pickled it from a script, as `__main__`."""

    weight: np.ndarray
    scales: np.ndarray


QuantizedWeight8bit.__module__ = "__main__"


@contextmanager
def pickled_as_main() -> Iterator[None]:
    main = sys.modules["__main__"]
    main.QuantizedWeight8bit = QuantizedWeight8bit  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del main.QuantizedWeight8bit  # type: ignore[attr-defined]


def quantized_model(config: GrokConfig = TWELVE_LAYERS, seed: int = 0) -> GrokModel:
    """The int8 model every checkpoint below encodes."""
    return GrokModel(config).init_random_(seed).quantized()


def dequantized(model: GrokModel) -> GrokModel:
    """A float32 model holding the int8 model's matrices as `weight · scale`."""
    dense = GrokModel(model.config)
    state = model.state_dict()
    values = {}
    for name in dense.state_dict():
        if f"{name}.scales" in state:
            values[name] = per_block_product(state[f"{name}.weight"], state[f"{name}.scales"])
        else:
            values[name] = state[name]
    dense.load_state_dict(values)
    return dense


def per_block_product(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight · scale, row by row (spec §3: row r uses scale block r // (rows / S))."""
    rows, blocks = weight.shape[-2], scales.shape[-2]
    out = torch.empty(weight.shape, dtype=torch.float32)
    for r in range(rows):
        out[..., r, :] = weight[..., r, :].float() * scales[..., r // (rows // blocks), :].float()
    return out


# -- the xAI release ---------------------------------------------------------------------------------

# Spec §3: the order of one layer's files, and our name for each.
LAYER_FILES = (
    ("moe/linear/w", "moe.w_gate"),
    ("moe/linear_1/w", "moe.w_down"),
    ("moe/linear_v/w", "moe.w_up"),
    ("multi_head_attention/key/w", "attn.wk"),
    ("multi_head_attention/linear/w", "attn.wo"),
    ("multi_head_attention/query/w", "attn.wq"),
    ("multi_head_attention/value/w", "attn.wv"),
    ("rms_norm/scale", "pre_attn_norm.scale"),
    ("rms_norm_1/scale", "post_attn_norm.scale"),
    ("rms_norm_2/scale", "pre_moe_norm.scale"),
    ("rms_norm_3/scale", "post_moe_norm.scale"),
    ("router/w", "moe.router"),
)


def released_file_order(num_layers: int) -> list[str]:
    """Our parameter name for tensor00000_000, tensor00001_000, ..."""
    order = ["embed.weight", "final_norm.scale"]
    for layer in sorted(str(i) for i in range(num_layers)):  # "0", "1", "10", "11", "2", ...
        order += [f"layers.{layer}.{ours}" for _, ours in LAYER_FILES]
    return order


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def reference_config(config: GrokConfig) -> dict[str, object]:
    """config.json as the reference's run.py names the fields."""
    return config.to_dict()


def write_released(
    model: GrokModel, root: Path, with_config: bool = True, protocol: int = 4
) -> Path:
    """`root/ckpt-0/tensorNNNNN_000` (+ `root/config.json`) from an int8 model; returns root."""
    ckpt = root / "ckpt-0"
    ckpt.mkdir(parents=True)
    for index, name in enumerate(released_file_order(model.config.num_layers)):
        owner, attribute = name.rsplit(".", 1)
        value = getattr(model.get_submodule(owner), attribute)
        if isinstance(value, QuantizedWeight):
            stored: object = QuantizedWeight8bit(to_numpy(value.weight), to_numpy(value.scales))
        else:
            stored = to_numpy(value.detach())
        with pickled_as_main(), open(ckpt / f"tensor{index:05d}_000", "wb") as file:
            pickle.dump(stored, file, protocol=protocol)
    if with_config:
        (root / "config.json").write_text(json.dumps(reference_config(model.config)))
    return root


# -- Hugging Face ports ------------------------------------------------------------------------------


def hf_config(config: GrokConfig) -> dict[str, object]:
    return {
        "architectures": ["Grok1ModelForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.emb_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.key_size,
        "attn_output_multiplier": config.attn_output_multiplier,
        "embedding_multiplier_scale": config.embedding_multiplier_scale,
        "output_multiplier_scale": config.output_multiplier_scale,
        "max_attn_value": config.max_attn_value,
        "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_selected_experts,
        "pad_token_id": config.pad_token,
        "bos_token_id": config.bos_token,
        "eos_token_id": config.eos_token,
    }


def hf_tensors(model: GrokModel, naming: str) -> dict[str, torch.Tensor]:
    """A float model's tensors as a port names them: `[out, in]` matrices, one tensor per expert."""
    state = model.state_dict()
    if naming == "transformer":
        out = {
            "transformer.in_out_embed.weight": state["embed.weight"],
            "transformer.rms_norm.weight": state["final_norm.scale"],
        }
        norms = ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")
        attn = {"wq": "query", "wk": "key", "wv": "value", "wo": "linear"}
        layer_prefix, attn_name, router, expert = (
            "transformer.decoder_layer.{i}.",
            "multi_head_attention.{x}.weight",
            "router.weight",
            "moe.{e}.{kind}.weight",
        )
    elif naming == "model":
        out = {
            "model.embed_tokens.weight": state["embed.weight"],
            "model.norm.weight": state["final_norm.scale"],
        }
        norms = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
        attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        layer_prefix, attn_name, router, expert = (
            "model.layers.{i}.",
            "attn.{x}.weight",
            "moe_block.gate.weight",
            "moe_block.experts.{e}.{kind}.weight",
        )
    else:
        raise ValueError(f"unknown naming {naming!r}")
    ours_norms = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
    for i in range(model.config.num_layers):
        theirs, ours = layer_prefix.format(i=i), f"layers.{i}."
        for their_norm, our_norm in zip(norms, ours_norms, strict=True):
            out[f"{theirs}{their_norm}.weight"] = state[f"{ours}{our_norm}.scale"]
        for our_matrix, their_matrix in attn.items():
            out[theirs + attn_name.format(x=their_matrix)] = state[f"{ours}attn.{our_matrix}"].T
        out[theirs + router] = state[f"{ours}moe.router"].T
        for our_matrix, kind in (
            ("w_gate", "linear"),
            ("w_up", "linear_v"),
            ("w_down", "linear_1"),
        ):
            for e, matrix in enumerate(state[f"{ours}moe.{our_matrix}"]):
                out[theirs + expert.format(e=e, kind=kind)] = matrix.T
    return {name: tensor.contiguous() for name, tensor in out.items()}


def write_hf(model: GrokModel, directory: Path, naming: str, shards: int = 1) -> Path:
    """A Hugging Face directory: config.json + model.safetensors, or `shards` files and an index."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model.config)))
    tensors = hf_tensors(model, naming)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = list(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard::shards]
        save_file({name: tensors[name] for name in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


# -- ours ----------------------------------------------------------------------------------------------


def write_native(model: GrokModel, directory: Path) -> Path:
    return save_pretrained(model, directory)


@dataclass
class Checkpoints:
    """One int8 model, its dequantised float twin, and directories holding them in every format."""

    quantized: GrokModel
    dense: GrokModel
    paths: dict[str, Path]


def write_all(root: Path, config: GrokConfig = TWELVE_LAYERS, seed: int = 0) -> Checkpoints:
    quantized = quantized_model(config, seed)
    dense = dequantized(quantized)
    paths = {
        "xai": write_released(quantized, root / "xai"),
        "hf-transformer": write_hf(dense, root / "hf-transformer", "transformer"),
        "hf-model": write_hf(dense, root / "hf-model", "model"),
        "hf-transformer-sharded": write_hf(dense, root / "hf-t-sharded", "transformer", shards=3),
        "hf-model-sharded": write_hf(dense, root / "hf-m-sharded", "model", shards=3),
        "grokserve": write_native(dense, root / "grokserve"),
        "grokserve-int8": write_native(quantized, root / "grokserve-int8"),
    }
    return Checkpoints(quantized, dense, paths)
