"""A thin wrapper over SentencePiece; the special ids (spec §5) come from the model's config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from grokserve.model.config import SpecialTokens

TOKENIZER_FILE = "tokenizer.model"  # looked for next to a checkpoint's weights


class TokenizerError(ValueError):
    pass


def beside_checkpoint(directory: str | Path) -> Path | None:
    """The tokenizer shipped in a checkpoint directory, if there is one."""
    path = Path(directory) / TOKENIZER_FILE
    return path if path.is_file() else None


class Tokenizer:
    def __init__(self, path: str | Path, special: SpecialTokens) -> None:
        path = Path(path)
        self.special = special
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path}")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path} is not a SentencePiece model: {error}") from error
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.processor.EncodeAsIds(text)
        return [self.special.bos, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.DecodeIds([i for i in ids if i not in self.special])

    def piece(self, token: int) -> str:
        return self.processor.IdToPiece(token)

    def token_id(self, piece: str) -> int:
        return self.processor.PieceToId(piece)
