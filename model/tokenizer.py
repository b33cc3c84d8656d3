"""A thin wrapper over SentencePiece with Grok-1's special ids (spec §5)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

PAD, BOS, EOS, UNK = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"  # looked for next to a checkpoint's weights


class TokenizerError(ValueError):
    pass


def beside_checkpoint(directory: str | Path) -> Path | None:
    """The tokenizer shipped in a checkpoint directory, if there is one."""
    path = Path(directory) / TOKENIZER_FILE
    return path if path.is_file() else None


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
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
        return [BOS, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.DecodeIds([i for i in ids if i not in (PAD, BOS, EOS)])

    def piece(self, token: int) -> str:
        return self.processor.IdToPiece(token)

    def token_id(self, piece: str) -> int:
        return self.processor.PieceToId(piece)
