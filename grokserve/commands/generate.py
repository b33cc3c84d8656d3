"""`grokserve generate`: load a checkpoint (or a randomly initialised preset) and continue a prompt."""

from __future__ import annotations

import argparse
import sys
import time

from grokserve.commands.serve import add_cache_dir

HELP = "print the continuation of a prompt by a checkpoint or a random preset model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        metavar="URL",
        help="checkpoint: a directory (any format), file://, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
        "or hf://ORG/REPO[@REVISION][/SUBDIR]; default: the demo checkpoint, as serve uses",
    )
    source.add_argument(
        "--preset", metavar="NAME", help="random weights of a preset, e.g. grok-tiny"
    )
    parser.add_argument("--prompt", required=True, help="text, or token ids like '5 17 9'")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="SentencePiece tokenizer.model, same locations as --checkpoint (default: the "
        "checkpoint's own, if it has one)",
    )
    add_cache_dir(parser)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (and a preset's weights)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--int8", action="store_true", help="keep 8-bit weights as stored")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1, as each shard worker of serve with cpusPerShard 1): more "
        "threads than free cores make every step wait for the slowest",
    )
    parser.add_argument("--config", help="preset name or config JSON (overrides the checkpoint's)")


def prompt_ids(prompt: str, tokenizer: object | None, vocab_size: int) -> list[int]:
    """Without a tokenizer the prompt is token ids ('5 17 9') or else its UTF-8 bytes as ids."""
    if tokenizer is not None:
        return tokenizer.encode(prompt)  # type: ignore[attr-defined]
    parts = prompt.split()
    if parts and all(part.isdigit() for part in parts):
        ids = [int(part) for part in parts]
    else:
        ids = list(prompt.encode())
    if any(i >= vocab_size for i in ids):
        raise ValueError(
            f"prompt token ids must be below the vocabulary size {vocab_size}; "
            "pass --tokenizer to encode text"
        )
    return ids


def render(tokenizer: object, ids: list[int]) -> str:
    """Decoded text; ids the tokenizer does not know (a model with a larger vocabulary) as [id]."""
    known = tokenizer.vocab_size  # type: ignore[attr-defined]
    text, run_of_known = [], []
    for token in [*ids, None]:
        if token is not None and token < known:
            run_of_known.append(token)
            continue
        if run_of_known:
            text.append(tokenizer.decode(run_of_known))  # type: ignore[attr-defined]
            run_of_known = []
        if token is not None:
            text.append(f"[{token}]")
    return "".join(text)


def run(args: argparse.Namespace) -> int:
    import torch

    from grokserve.model import GrokModel, load_model
    from grokserve.model.checkpoint import CheckpointError
    from grokserve.model.config import ConfigError
    from grokserve.model.loading import parse_dtype
    from grokserve.model.placement import Quantization
    from grokserve.model.sampling import SamplingParams, generate
    from grokserve.model.sources import checkpoint_files, fetch
    from grokserve.model.tokenizer import Tokenizer, TokenizerError, beside_checkpoint
    from grokserve.serving.loading import DEMO_CHECKPOINT

    if args.threads < 1:
        print("grokserve generate: --threads must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.checkpoint is None and args.preset is None:
        args.checkpoint = str(DEMO_CHECKPOINT)
    started = time.perf_counter()
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        checkpoint = (
            fetch(args.checkpoint, args.cache_dir, checkpoint_files, progress=True).path
            if args.checkpoint
            else None
        )
        tokenizer_path = (
            fetch(args.tokenizer, args.cache_dir, progress=True).path
            if args.tokenizer
            else (beside_checkpoint(checkpoint) if checkpoint else None)
        )
        quantization: Quantization = "int8" if args.int8 else None
        if checkpoint:
            model = load_model(
                checkpoint, args.dtype, args.device, args.config, quantization=quantization
            )
        else:
            model = GrokModel.from_preset(args.preset, args.seed, parse_dtype(args.dtype))
            model = (model.quantized() if quantization else model).to(args.device)
        special = model.config.special_tokens
        tokenizer = Tokenizer(tokenizer_path, special) if tokenizer_path else None
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                f"{model.config.vocab_size} token ids"
            )
        prompt = prompt_ids(args.prompt, tokenizer, model.config.vocab_size)
        produced = generate(model, prompt, params)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as error:
        print(f"grokserve generate: {error}", file=sys.stderr)
        return 1
    if tokenizer is not None:
        print(render(tokenizer, produced))
    else:
        print(" ".join(str(token) for token in produced))
    seconds = time.perf_counter() - started
    print(
        f"[{len(prompt)} prompt tokens, {len(produced)} generated, {seconds:.2f} s]",
        file=sys.stderr,
    )
    return 0
