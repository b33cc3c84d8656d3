"""Grok-1 as PyTorch modules, read top to bottom: embedding, 64 decoder layers, final norm, tied output.

Matrices keep the reference's `[in, out]` orientation so that the released checkpoint (and its 8-bit
row-block scales) maps onto them without transposes. Parameter names (`state_dict`):

    embed.weight [V, D]                      final_norm.scale [D]
    layers.{i}.{pre_attn,post_attn,pre_moe,post_moe}_norm.scale [D]
    layers.{i}.attn.{wq [D, Hq·K], wk [D, Hkv·K], wv [D, Hkv·K], wo [Hq·K, D]}
    layers.{i}.moe.router [D, E]   (float32)
    layers.{i}.moe.{w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]}

With `quantization="int8"` each matrix above is a `QuantizedWeight` (`<name>.weight` int8 and
`<name>.scales` bf16). Norm scales and the router are always float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, cast

import torch
from torch import nn

from grokserve.model import kernels, layers
from grokserve.model.blocks import DEFAULT_BLOCK_SIZE
from grokserve.model.cache import KVCache
from grokserve.model.config import GrokConfig
from grokserve.model.paged import PagedKVCache, PagedStep
from grokserve.model.presets import preset
from grokserve.model.quantization import QuantizedWeight, dense, quantize

Quantization = Literal["int8"] | None
Matrix = nn.Parameter | QuantizedWeight

# Row blocks of the released scales: S = 8 for the two row-parallel matrices, 1 elsewhere (spec §3).
ROW_BLOCKS = {"wo": 8, "w_down": 8}


def empty_quantized(shape: torch.Size, row_blocks: int, device: torch.device) -> QuantizedWeight:
    """Storage for an 8-bit matrix that a loader fills."""
    scales_shape = (*shape[:-2], row_blocks, shape[-1])
    return QuantizedWeight(
        torch.zeros(shape, dtype=torch.int8, device=device),
        torch.ones(scales_shape, dtype=torch.bfloat16, device=device),
    )


def new_matrix(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None
) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(
            torch.ones(size, dtype=torch.float32, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return layers.rms_norm(x, self.scale, self.eps, dtype)


class Attention(nn.Module):
    """GQA self-attention over `q_heads` query and `kv_heads` kv heads (all of them, or one shard's)."""

    MATRICES = ("wq", "wk", "wv", "wo")

    def __init__(
        self,
        config: GrokConfig,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        q_heads: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.q_heads = q_heads or config.num_q_heads
        self.kv_heads = kv_heads or config.num_kv_heads
        d, k = config.emb_size, config.key_size
        self.wq = new_matrix((d, self.q_heads * k), dtype, device)
        self.wk = new_matrix((d, self.kv_heads * k), dtype, device)
        self.wv = new_matrix((d, self.kv_heads * k), dtype, device)
        self.wo = new_matrix((self.q_heads * k, d), dtype, device)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        dtype, key_size = x.dtype, self.config.key_size
        q = (x @ dense(self.wq, dtype)).view(batch, steps, self.q_heads, key_size)
        k = (x @ dense(self.wk, dtype)).view(batch, steps, self.kv_heads, key_size)
        v = (x @ dense(self.wv, dtype)).view(batch, steps, self.kv_heads, key_size)
        q = layers.apply_rope(q, step.positions, self.config.rope_theta)
        k = layers.apply_rope(k, step.positions, self.config.rope_theta)
        config = self.config
        out = step.attend(layer, q, k, v, config.attn_output_multiplier, config.max_attn_value)
        return out.reshape(batch, steps, self.q_heads * key_size) @ dense(self.wo, dtype)


class MoE(nn.Module):
    """Router over all experts and the gated expert FFNs this module holds (all, or one shard's).

    `expert_ids` are the global ids of the experts held (expert parallelism); `ffn_size` may be a slice
    of the full hidden size (experts split along F). Either way the output is this module's share of
    the full sum, so shards add their outputs.
    """

    MATRICES = ("w_gate", "w_up", "w_down")
    # A buffer registered in __init__; declared here so it types as a tensor, not Tensor | Module.
    routed_tokens: torch.Tensor

    def __init__(
        self,
        config: GrokConfig,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        expert_ids: Sequence[int] | None = None,
        ffn_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.expert_ids = expert_ids if expert_ids is not None else range(config.num_experts)
        d, f, e = config.emb_size, ffn_size or config.ffn_size, len(self.expert_ids)
        self.router = nn.Parameter(
            torch.empty(d, config.num_experts, dtype=torch.float32, device=device),
            requires_grad=False,
        )
        self.w_gate = new_matrix((e, d, f), dtype, device)
        self.w_up = new_matrix((e, d, f), dtype, device)
        self.w_down = new_matrix((e, f, d), dtype, device)
        # Tokens routed to each expert since creation: data for load-aware placement and metrics.
        self.register_buffer(
            "routed_tokens",
            torch.zeros(config.num_experts, dtype=torch.long, device=device),
            persistent=False,
        )

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, experts = layers.route(flat, self.router, self.config.num_selected_experts)
        # scatter_add_ rather than boolean indexing and bincount: no host sync, so a decode step can
        # be captured in a CUDA graph.
        valid = step.token_valid.reshape(-1, 1).expand_as(experts).to(torch.long)
        self.routed_tokens.scatter_add_(0, experts.reshape(-1), valid.reshape(-1))
        # The weights go as they are (int8 ones included): the fused kernel dequantises on the fly.
        out = kernels.moe(
            flat,
            gates,
            experts,
            self.w_gate,
            self.w_up,
            self.w_down,
            self.expert_ids,
        )
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: GrokConfig, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.pre_attn_norm = RMSNorm(config.emb_size, eps, device)
        self.attn = Attention(config, dtype, device)
        self.post_attn_norm = RMSNorm(config.emb_size, eps, device)
        self.pre_moe_norm = RMSNorm(config.emb_size, eps, device)
        self.moe = MoE(config, dtype, device)
        self.post_moe_norm = RMSNorm(config.emb_size, eps, device)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        # Grok normalises each branch's output as well as its input: four norms per layer. A branch's
        # output norm stays float32 into the residual sum, rounded once (no bf16 round trip).
        dtype = x.dtype
        branch = self.post_attn_norm(self.attn(self.pre_attn_norm(x), step, layer), torch.float32)
        x = (x + branch).to(dtype)
        branch = self.post_moe_norm(self.moe(self.pre_moe_norm(x), step), torch.float32)
        return (x + branch).to(dtype)


class Step:
    """Where one forward call's tokens sit: positions, visible keys, and the cache rows they extend.

    (`paged.PagedStep` is the same interface over a paged cache, with no host sync.)"""

    def __init__(
        self, tokens: torch.Tensor, pad_token: int, cache: KVCache | None, rows: torch.Tensor | None
    ):
        self.cache = cache
        self.token_valid = tokens != pad_token
        if cache is None and rows is not None:
            raise ValueError("rows select cache rows; they need a cache")
        if cache is None:
            self.rows = None
            steps = tokens.shape[1]
            self.positions = torch.arange(steps, device=tokens.device).expand(
                tokens.shape[0], steps
            )
            self.key_valid = self.token_valid
            self.span = steps
            return
        self.rows = cache.all_rows() if rows is None else rows.to(cache.lengths.device, torch.long)
        if self.rows.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"tokens have {tokens.shape[0]} row(s) but {self.rows.shape[0]} cache row(s) were given"
            )
        self.positions = cache.begin_append(self.rows, self.token_valid)
        self.span = int(self.positions.max()) + 1
        self.key_valid = cache.visible_keys(self.rows, self.span)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logit_multiplier: float,
        cap: float,
    ) -> torch.Tensor:
        if self.cache is not None and self.rows is not None:  # rows are set exactly with a cache
            k, v = self.cache.write(layer, self.rows, self.positions, k, v, self.span)
        return kernels.attention(q, k, v, self.positions, self.key_valid, logit_multiplier, cap)

    def finish(self) -> None:
        if self.cache is not None and self.rows is not None:
            self.cache.end_append(self.rows, self.positions.shape[1])


class GrokModel(nn.Module):
    def __init__(
        self,
        config: GrokConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        quantization: Quantization = None,
    ) -> None:
        super().__init__()
        if quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        self.embed = nn.Embedding(config.vocab_size, config.emb_size, dtype=dtype, device=device)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device) for _ in range(config.num_layers)
        )
        self.final_norm = RMSNorm(config.emb_size, config.rms_norm_eps, device)
        if quantization == "int8":
            self._replace_matrices(
                lambda name, matrix: empty_quantized(
                    matrix.shape, ROW_BLOCKS.get(name, 1), matrix.device
                )
            )

    def decoder_layers(self) -> list[DecoderLayer]:
        # nn.ModuleList is not generic: its items type as Module, and every one here is a DecoderLayer.
        return [cast(DecoderLayer, layer) for layer in self.layers]

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> GrokModel:
        """A randomly initialised model of a named preset (for tests and demos)."""
        return cls(preset(name), dtype=dtype).init_random_(seed)

    def init_random_(self, seed: int) -> GrokModel:
        """Deterministic random weights that exercise every part (norm scales away from 1, sharp routing)."""
        if self.quantization:
            raise ValueError("initialise a float model, then call quantized()")
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in self.state_dict().items():
            if name.endswith("scale"):
                values = 0.5 + torch.rand(tensor.shape, generator=generator)
            elif name.endswith("router"):
                values = torch.randn(tensor.shape, generator=generator)
            else:  # embeddings and matrices: unit-variance outputs for unit-variance inputs
                fan_in = tensor.shape[-1] if name.startswith("embed") else tensor.shape[-2]
                values = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
            tensor.copy_(values.to(tensor.dtype))
        return self

    def _replace_matrices(self, convert: Callable[[str, torch.Tensor], QuantizedWeight]) -> None:
        for module in self.modules():
            if isinstance(module, Attention | MoE):
                for name in module.MATRICES:
                    matrix = getattr(module, name)
                    delattr(module, name)  # a parameter slot cannot take a module
                    setattr(module, name, convert(name, matrix))

    def astype(self, dtype: torch.dtype) -> GrokModel:
        """A copy computing in `dtype` (norm scales and router stay float32)."""
        copy = GrokModel(self.config, dtype, self.embed.weight.device, self.quantization)
        copy.load_state_dict(self.state_dict())
        return copy

    def quantized(self) -> GrokModel:
        """An int8 copy of this float model's matrices, with row-block scales as in the release."""
        if self.quantization:
            raise ValueError("the model is already quantised")
        copy = self.astype(self.dtype)
        copy.quantization = "int8"
        copy._replace_matrices(
            lambda name, matrix: quantize(matrix.float(), ROW_BLOCKS.get(name, 1))
        )
        return copy

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.config.sequence_len
        if max_len > self.config.sequence_len:
            raise ValueError(
                f"max_len {max_len} exceeds the context length {self.config.sequence_len}"
            )
        attn = self.decoder_layers()[0].attn
        return KVCache(
            self.config.num_layers,
            batch_size,
            max_len,
            attn.kv_heads,
            self.config.key_size,
            self.dtype,
            self.embed.weight.device,
        )

    def expert_token_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far: LongTensor [layers, experts]."""
        return torch.stack([layer.moe.routed_tokens for layer in self.decoder_layers()]).cpu()

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a LongTensor [batch, steps], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.numel() and (
            int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size
        ):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab]; with a cache, appends the tokens to its rows."""
        self.check_tokens(tokens)
        step = Step(tokens, self.config.pad_token, cache, rows)
        x = self.hidden_states(tokens, step)
        step.finish()
        return self.logits(x)

    def hidden_states(self, tokens: torch.Tensor, step: Step | PagedStep) -> torch.Tensor:
        x = self.embed(tokens) * layers.rounded(self.config.embedding_multiplier_scale, self.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, step, index)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the tied output projection: [..., D] -> float32 [..., vocab]."""
        z = self.final_norm(x)
        # The multiplier applies to the rounded product in float32: no bf16 round trip of the logits.
        multiplier = layers.rounded(self.config.output_multiplier_scale, self.dtype).float()
        return (z @ self.embed.weight.T).float() * multiplier

    def new_paged_cache(
        self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> PagedKVCache:
        """A paged cache of `num_blocks` usable blocks (plus the null block) on the model's device."""
        return PagedKVCache(
            self.config.num_layers,
            num_blocks,
            block_size,
            self.decoder_layers()[0].attn.kv_heads,
            self.config.key_size,
            self.dtype,
            self.embed.weight.device,
        )

    def forward_paged(
        self,
        cache: PagedKVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        every_position: bool = False,
    ) -> torch.Tensor:
        """One step over a paged cache -> float32 logits [B, vocab] of each row's LAST column
        ([B, T, vocab] of every column with `every_position`, for prompt logprobs).

        Rows are left-padded to the step's width T: tokens, positions [B, T] (position -1 marks
        padding);
        block_tables [B, max_blocks]; lengths [B] (cached tokens per row after the step). The tokens'
        keys and values are written to their blocks. Only the last column reaches the output
        projection, in prefill too. No host sync and no data-dependent shape: this is the step that
        `torch.compile(fullgraph=True)` and CUDA graphs take whole (see `grokserve.model.engine_step`).
        Token ids are not range-checked here (that would read them back): the caller checks them."""
        step = PagedStep(cache, tokens, positions, block_tables, lengths)
        x = self.hidden_states(tokens, step)
        return self.logits(x if every_position else x[:, -1])
