"""Small SentencePiece tokenizers trained in seconds, with Grok-1's special ids (no hub downloads)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from grokserve.model.presets import preset

# The special ids of every preset (Grok-1's): what the tokenizers trained here use.
GROK_SPECIAL = preset("grok-1").special_tokens

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. Grok is a mixture of experts model.
Kubernetes operators reconcile custom resources into running workloads.
Each token is routed to two of eight experts, and their outputs are weighted by the router.
Attention logits are scaled, soft-capped at thirty, and masked before the softmax.
The cache keeps keys after the rotary embedding, so decoding appends one token per step.
Grok-1 has 64 layers, 48 query heads, 8 kv heads and 314 billion parameters; 2024 0123456789.
"""


def train_tokenizer(directory: Path, vocab_size: int = 200, text: str = SAMPLE_TEXT) -> Path:
    """Trains a BPE model with [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3 and returns its path."""
    prefix = directory / "tokenizer"
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(text.splitlines() * 20),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=GROK_SPECIAL.pad,
        bos_id=GROK_SPECIAL.bos,
        eos_id=GROK_SPECIAL.eos,
        unk_id=max(GROK_SPECIAL) + 1,
        pad_piece="[PAD]",
        bos_piece="[BOS]",
        eos_piece="[EOS]",
        unk_piece="[UNK]",
        split_digits=True,
        minloglevel=2,
    )
    return Path(f"{prefix}.model")
