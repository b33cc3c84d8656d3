"""`grokserve inspect` and `grokserve generate` on tiny checkpoints written by the test helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grokserve.cli import main
from grokserve.model import GrokModel
from grokserve.model.sampling import SamplingParams, generate
from grokserve.model.tokenizer import Tokenizer
from testkit.checkpoints import TWELVE_LAYERS, Checkpoints, write_all, write_native
from testkit.tokenizers import GROK_SPECIAL, train_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return write_all(tmp_path_factory.mktemp("cli"))


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["inspect", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("kind", "fmt", "dtypes"),
    [
        ("xai", "xai", {"float32", "int8+bfloat16 scales"}),
        ("hf-model-sharded", "hf", {"float32"}),
        ("grokserve-int8", "grokserve", {"float32", "int8+bfloat16 scales"}),
    ],
)
def test_inspect_reports_format_config_size_and_dtypes(
    checkpoints: Checkpoints, capsys: pytest.CaptureFixture[str], kind: str, fmt: str, dtypes: set
) -> None:
    summary = inspect_json(checkpoints.paths[kind], capsys, "--tensors")
    assert summary["format"] == fmt
    assert summary["config"] == TWELVE_LAYERS.to_dict()
    assert summary["parameters"] == TWELVE_LAYERS.num_parameters()
    assert set(summary["dtypes"]) == dtypes
    model = checkpoints.quantized if "int8" in str(dtypes) else checkpoints.dense
    stored_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert summary["bytes"] == stored_bytes
    wo = next(t for t in summary["tensors"] if t["name"] == "layers.10.attn.wo")
    assert wo["shape"] == [16, 16]
    if fmt != "hf":
        assert (wo["dtype"], wo["scales_shape"], wo["scales_dtype"]) == (
            "int8",
            [8, 16],
            "bfloat16",
        )


def test_inspect_text_output(checkpoints: Checkpoints, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(checkpoints.paths["xai"])]) == 0
    out = capsys.readouterr().out
    assert "format:      xai" in out
    assert f"parameters:  {TWELVE_LAYERS.num_parameters():,}" in out
    assert "num_layers" in out and "int8+bfloat16 scales" in out


def test_inspect_wrong_path_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert "is not a checkpoint; expected one of" in capsys.readouterr().err


def test_inspect_rejects_a_config_with_a_zero_field(
    checkpoints: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "hf"
    shutil.copytree(checkpoints.paths["hf-model"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    assert main(["inspect", str(broken)]) == 1
    assert "num_attention_heads must be a positive integer, got 0" in capsys.readouterr().err


def test_generate_from_a_checkpoint_with_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer_path = train_tokenizer(tmp_path, vocab_size=256)  # grok-tiny's vocabulary
    model = GrokModel.from_preset("grok-tiny", seed=7)
    saved = write_native(model, tmp_path / "tiny")
    args = ["generate", "--checkpoint", str(saved), "--tokenizer", str(tokenizer_path)]
    assert main([*args, "--prompt", "The quick brown fox", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = Tokenizer(tokenizer_path, GROK_SPECIAL)
    expected = generate(
        model, tokenizer.encode("The quick brown fox"), SamplingParams(temperature=0, max_tokens=6)
    )
    assert printed == tokenizer.decode(expected).strip()


def test_generate_reads_the_tokenizer_shipped_with_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = write_native(GrokModel.from_preset("grok-tiny", seed=7), tmp_path / "tiny")
    shutil.copy(train_tokenizer(tmp_path, vocab_size=256), saved / "tokenizer.model")
    args = ["generate", "--checkpoint", str(saved), "--prompt", "The quick brown fox"]
    assert main([*args, "--max-tokens", "6"]) == 0
    shipped = capsys.readouterr().out.strip()
    assert main([*args, "--max-tokens", "6", "--tokenizer", str(saved / "tokenizer.model")]) == 0
    assert shipped == capsys.readouterr().out.strip()
    assert not re.fullmatch(r"[\d ]+", shipped.splitlines()[0]), "printed ids, not text"


def test_generate_shows_ids_beyond_a_smaller_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer_path = train_tokenizer(tmp_path, vocab_size=200)  # the model has 256 token ids
    saved = write_native(GrokModel.from_preset("grok-tiny", seed=7), tmp_path / "tiny")
    args = ["generate", "--checkpoint", str(saved), "--tokenizer", str(tokenizer_path)]
    assert main([*args, "--prompt", "The quick brown fox", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\[2[0-5]\d\]", printed), printed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_preset_prints_token_ids(capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    args = ["--preset", "grok-tiny", "--prompt", "5 17 9", "--max-tokens", "5", "--dtype", dtype]
    assert main(["generate", *args]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    model = GrokModel.from_preset("grok-tiny", seed=0, dtype=getattr(torch, dtype))
    assert ids == generate(model, [5, 17, 9], SamplingParams(temperature=0, max_tokens=5))


def test_generate_sampling_is_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--preset", "grok-tiny", "--prompt", "hello", "--temperature", "1.0"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--max-tokens", "12", "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "grok-9000", "--prompt", "x"], "unknown preset 'grok-9000'"),
        (["--preset", "grok-tiny", "--prompt", "5 999"], "below the vocabulary size 256"),
        (["--preset", "grok-tiny", "--prompt", "x", "--top-p", "0"], "top_p must be in"),
        (["--checkpoint", "/no/such/dir", "--prompt", "x"], "does not exist; expected one of"),
        (["--preset", "grok-tiny", "--prompt", "x", "--tokenizer", "/no/t.model"], "not found"),
    ],
)
def test_generate_bad_input_fails_clearly(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", *args]) == 1
    assert message in capsys.readouterr().err


def test_generate_preset_runs_as_a_command_in_seconds() -> None:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "grokserve", "generate", "--preset", "grok-tiny", "--prompt", "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 16  # default --max-tokens, unless EOS came first
    assert time.monotonic() - started < 60
