"""Train the small demo checkpoint that `grokserve serve` serves by default.

    python scripts/train_demo.py                 # at most 20 minutes on 2 CPU cores
    python scripts/train_demo.py --rebuild-corpus  # re-extract the corpus first

The corpus (`scripts/demo_data/corpus.txt`, committed) is English prose that ships with Python: the
docstrings of the standard library's modules, classes and functions (PSF license), extracted by
`--rebuild-corpus`. The script trains a SentencePiece tokenizer on it (1024 pieces, Grok's special ids
[PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3), then a grok-mini-shaped model (4 layers, 8 experts, top-2) with
next-token cross-entropy, and writes `serving/demo/`: config.json, model.safetensors (bfloat16),
tokenizer.model and training.json (steps, final loss, seconds, corpus digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import pkgutil
import sys
import time
import warnings
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from grokserve.model import GrokModel, preset

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "demo_data" / "corpus.txt"
OUTPUT = ROOT / "serving" / "demo"
VOCAB = 1024
CORPUS_CHARS = 1_500_000
# Modules whose import has side effects (GUI, printing, network) or is slow.
_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "__", "lib2to3")


def docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library, in a stable order."""
    texts: list[str] = []
    names = sorted(
        m.name
        for m in pkgutil.iter_modules()
        if m.name in sys.stdlib_module_names and not m.name.startswith(_SKIP_PREFIXES)
    )
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # some platform-specific modules do not import here
            continue
        for _, obj in [(name, module), *sorted(inspect.getmembers(module))]:
            doc = inspect.getdoc(obj) if getattr(obj, "__module__", name) == name else None
            if doc and len(doc) > 80 and doc not in texts:
                texts.append(doc)
    return texts


def rebuild_corpus() -> None:
    text = "\n\n".join(docstrings())[:CORPUS_CHARS]
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text(text + "\n")
    print(f"wrote {CORPUS} ({len(text):,} characters)")


def train_tokenizer(corpus: Path, prefix: Path) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        max_sentence_length=100_000,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild-corpus", action="store_true")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=20.0, help="stop early after this long")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rebuild_corpus or not CORPUS.exists():
        rebuild_corpus()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS, OUTPUT / "tokenizer")
    (OUTPUT / "tokenizer.vocab").unlink(missing_ok=True)
    ids = torch.tensor(tokenizer.encode(CORPUS.read_text()), dtype=torch.long)
    print(f"corpus: {len(ids):,} tokens")

    config = dataclasses.replace(preset("grok-mini"), vocab_size=VOCAB, sequence_len=512)
    model = GrokModel(config).init_random_(0)
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    # GrokModel.forward runs under inference_mode (serving); training calls the undecorated one.
    forward = GrokModel.forward.__wrapped__
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    start, loss_value, step = time.monotonic(), float("nan"), 0
    budget = args.minutes * 60
    for step in range(1, args.steps + 1):
        # Cosine decay over whichever runs out first, the steps or the time budget.
        progress = max(step / args.steps, (time.monotonic() - start) / budget)
        lr = args.lr * min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(ids) - args.context - 1, (args.batch,))
        batch = torch.stack([ids[o : o + args.context + 1] for o in offsets])
        logits = forward(model, batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loss_value = loss.item()
        elapsed = time.monotonic() - start
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss_value:.3f}  {elapsed:5.0f}s", flush=True)
        if elapsed > budget:
            break

    config.to_json(OUTPUT / "config.json")
    state = {
        name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()
    }
    save_file(state, str(OUTPUT / "model.safetensors"))
    record = {
        "steps": step,
        "final_loss": round(loss_value, 4),
        "seconds": round(time.monotonic() - start),
        "batch": args.batch,
        "context": args.context,
        "corpus_sha256": hashlib.sha256(CORPUS.read_bytes()).hexdigest(),
        "corpus_tokens": len(ids),
    }
    (OUTPUT / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUTPUT}: {record}")


if __name__ == "__main__":
    main()
