"""Next-token selection: greedy, temperature, top-k, top-p, seeded; and when to stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from grokserve.model.logits import adjust

if TYPE_CHECKING:
    from grokserve.model.transformer import GrokModel


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence's next tokens are chosen, when it stops and which logprobs it reports:
    the one description of a request's decoding that `generate` and the serving engine share.

    temperature 0 means greedy; top_k 0 and top_p 1 disable those filters. The logit adjustments
    (`logit_bias`, the penalties, `min_tokens`) are applied by `grokserve.model.logits.adjust`
    before temperature, greedy included. `max_tokens` 0 scores the prompt without generating.
    `logprobs`: None reports none, k reports the chosen token's and the k most likely ones'.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_on_eos: bool = True
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
        )


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy picks the lowest id among equal maxima."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# Counter-based random numbers: a draw is a hash of (seed, position, token id), so a row's draws do
# not depend on which rows share its batch or on any generator state, need no host sync, and a
# sequence recomputed after preemption draws the same tokens again.
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.
    The multipliers are below 2**31, so no product overflows int64."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [B, vocab] in (0, 1), a pure function of each row's seed (int64) and position."""
    seeds, positions = seeds.long(), positions.long()
    row = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(positions)))
    ids = torch.arange(vocab, device=seeds.device)
    bits = _mix32(row[:, None] ^ _mix32(ids)[None, :])
    # 24 random bits, centred in their interval: never exactly 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_on_device(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Per-row sampling with no host sync and static shapes: logits [B, V] -> token ids [B].

    Row i uses temperature[i] (0: greedy, the lowest id among equal maxima), top_k[i] (0: off),
    top_p[i] (1: off), and draws with seeds[i] at positions[i] (the position of the token drawn)
    by the Gumbel-max trick: argmax(logits / T + Gumbel noise) samples softmax(logits / T)."""
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    ordered, _ = torch.sort(scaled, dim=-1, descending=True)
    # top-k: keep logits >= the k-th largest (k = 0 keeps all).
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    # top-p: keep the smallest prefix of the sorted tokens whose mass reaches p; ordered[j] is kept
    # while the mass before it is below p, so the cut is the smallest kept logit.
    probs = torch.softmax(ordered.masked_fill(ordered < kth, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs
    kept = (before < top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    cut = torch.maximum(kth, ordered.gather(1, kept - 1))
    filtered = scaled.masked_fill(scaled < cut, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
    drawn = (filtered + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


@torch.inference_mode()
def generate(
    model: GrokModel,
    prompt: list[int],
    params: SamplingParams,
) -> list[int]:
    """One sequence: prefill the prompt, then decode until EOS or max_tokens. Returns the new ids."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if params.max_tokens < 1:
        raise ValueError("max_tokens must be >= 1 to generate")
    config = model.config
    max_len = min(config.sequence_len, len(prompt) + params.max_tokens)
    if len(prompt) >= config.sequence_len:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; the context holds {config.sequence_len}"
        )
    seed = params.seed
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(batch_size=1, max_len=max_len)
    device = model.embed.weight.device
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]
    produced: list[int] = []
    while True:
        scores = logits.float().cpu()
        if params.adjusts_logits:
            scores = adjust(scores[0], params, prompt, produced, config.eos_token)[None]
        token = int(sample(scores, params.temperature, params.top_k, params.top_p, generator))
        produced.append(token)
        if (params.stop_on_eos and token == config.eos_token) or len(produced) >= params.max_tokens:
            return produced
        if len(prompt) + len(produced) >= max_len:
            return produced
        logits = model(torch.tensor([[token]], device=device), cache=cache)[:, -1]
