"""How other layouts name our parameters (grok1-spec.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

from grokserve.model.config import GrokConfig

NORMS = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")

# -- the released layout: reference (module, parameter) -> our name ---------------------------------

RELEASED_GLOBAL = {
    ("language_model/in_out_embed", "embeddings"): "embed.weight",
    ("language_model/rms_norm", "scale"): "final_norm.scale",
}
RELEASED_LAYER = {
    ("moe/linear", "w"): "moe.w_gate",
    ("moe/linear_v", "w"): "moe.w_up",
    ("moe/linear_1", "w"): "moe.w_down",
    ("multi_head_attention/query", "w"): "attn.wq",
    ("multi_head_attention/key", "w"): "attn.wk",
    ("multi_head_attention/value", "w"): "attn.wv",
    ("multi_head_attention/linear", "w"): "attn.wo",
    ("router", "w"): "moe.router",
    **{
        (f"rms_norm{suffix}", "scale"): f"{norm}.scale"
        for suffix, norm in zip(("", "_1", "_2", "_3"), NORMS, strict=True)
    },
}


def released_order(config: GrokConfig) -> list[tuple[str, str]]:
    """(reference path, our name) per file index: Haiku's {module: {param: array}} flattened by JAX,
    which sorts dict keys as strings, so layer 10 comes before layer 2."""
    entries = dict(RELEASED_GLOBAL)
    for layer in range(config.num_layers):
        for (module, param), ours in RELEASED_LAYER.items():
            entries[(f"transformer/decoder_layer_{layer}/{module}", param)] = (
                f"layers.{layer}.{ours}"
            )
    return [(f"{module}/{param}", entries[(module, param)]) for module, param in sorted(entries)]


# -- Hugging Face ports: [out, in] matrices, experts as separate tensors -----------------------------


@dataclass(frozen=True)
class HFNaming:
    name: str
    embed: str
    final_norm: str
    layer: str  # prefix with {i}
    norms: tuple[str, str, str, str]  # in the order of NORMS
    attn: dict[str, str]  # our matrix -> their name
    router: str
    expert: str  # with {e} and {kind}; kinds linear (gate), linear_v (up), linear_1 (down)


HF_NAMINGS = (
    HFNaming(
        name="transformer.decoder_layer",
        embed="transformer.in_out_embed.weight",
        final_norm="transformer.rms_norm.weight",
        layer="transformer.decoder_layer.{i}.",
        norms=("rms_norm.weight", "rms_norm_1.weight", "rms_norm_2.weight", "rms_norm_3.weight"),
        attn={
            "wq": "multi_head_attention.query.weight",
            "wk": "multi_head_attention.key.weight",
            "wv": "multi_head_attention.value.weight",
            "wo": "multi_head_attention.linear.weight",
        },
        router="router.weight",
        expert="moe.{e}.{kind}.weight",
    ),
    HFNaming(
        name="model.layers",
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        layer="model.layers.{i}.",
        norms=tuple(f"{norm}.weight" for norm in NORMS),  # type: ignore[arg-type]
        attn={
            "wq": "attn.q_proj.weight",
            "wk": "attn.k_proj.weight",
            "wv": "attn.v_proj.weight",
            "wo": "attn.o_proj.weight",
        },
        router="moe_block.gate.weight",
        expert="moe_block.experts.{e}.{kind}.weight",
    ),
)
EXPERT_KINDS = {"w_gate": "linear", "w_up": "linear_v", "w_down": "linear_1"}


@dataclass(frozen=True)
class HFSource:
    """Where one of our tensors lies in a port: one tensor, or one per expert to stack."""

    names: tuple[str, ...]
    transposed: bool
    stacked: bool


def hf_sources(naming: HFNaming, config: GrokConfig) -> dict[str, HFSource]:
    sources = {
        "embed.weight": HFSource((naming.embed,), transposed=False, stacked=False),
        "final_norm.scale": HFSource((naming.final_norm,), transposed=False, stacked=False),
    }
    for i in range(config.num_layers):
        theirs = naming.layer.format(i=i)
        ours = f"layers.{i}."
        for norm, their_norm in zip(NORMS, naming.norms, strict=True):
            sources[f"{ours}{norm}.scale"] = HFSource((theirs + their_norm,), False, False)
        for matrix, their_matrix in naming.attn.items():
            sources[f"{ours}attn.{matrix}"] = HFSource((theirs + their_matrix,), True, False)
        sources[f"{ours}moe.router"] = HFSource((theirs + naming.router,), True, False)
        for matrix, kind in EXPERT_KINDS.items():
            experts = tuple(
                theirs + naming.expert.format(e=e, kind=kind) for e in range(config.num_experts)
            )
            sources[f"{ours}moe.{matrix}"] = HFSource(experts, transposed=True, stacked=True)
    return sources
