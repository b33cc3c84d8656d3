"""Damaged, unsafe or misplaced checkpoints fail with errors that say what is wrong, and run nothing."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from grokserve.model import load_model
from grokserve.model.checkpoint import CheckpointError, UnsafePickleError, open_checkpoint
from grokserve.model.checkpoint.unpickler import (
    ScanningUnpickler,
    SkippingFile,
    load_pickle,
    scan_pickle,
)
from testkit.checkpoints import (
    TWELVE_LAYERS,
    QuantizedWeight8bit,
    dequantized,
    pickled_as_main,
    quantized_model,
    write_hf,
    write_native,
    write_released,
)


class RunsShell:
    """Unpickling this calls os.system: what a planted checkpoint file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_released(quantized_model(), tmp_path_factory.mktemp("release") / "xai")


def copy_of(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "copy"))


@pytest.mark.parametrize("where", ["whole file", "inside QuantizedWeight8bit"])
def test_planted_code_is_refused_and_never_runs(release: Path, tmp_path: Path, where: str) -> None:
    planted = copy_of(release, tmp_path)
    marker = tmp_path / "pwned"
    payload = RunsShell(f"touch {marker}")
    target = planted / "ckpt-0" / "tensor00030_000"  # layers.10.attn.wo, an 8-bit matrix
    value: object = payload
    if where != "whole file":
        value = QuantizedWeight8bit(payload, np.ones((8, 16), dtype=np.float32))  # type: ignore[arg-type]
    with pickled_as_main():
        target.write_bytes(pickle.dumps(value, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle global (posix|os)\.system"):
        load_model(planted)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        open_checkpoint(planted).info("layers.10.attn.wo")  # the header scan refuses it too
    assert not marker.exists()
    with pickled_as_main():  # the planted file is live: a plain unpickler runs it
        pickle.loads(target.read_bytes())
    assert marker.exists()


def test_object_arrays_are_refused(release: Path, tmp_path: Path) -> None:
    planted = copy_of(release, tmp_path)
    (planted / "ckpt-0" / "tensor00001_000").write_bytes(
        pickle.dumps(np.array([1, "x"], dtype=object), protocol=4)
    )
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(planted)


def float32_pickle_with_dtype_flags(array: np.ndarray, flags: int, protocol: int) -> bytes:
    """The array's pickle with its dtype's BUILD state carrying `flags` (numpy writes 0)."""
    data = pickle.dumps(array, protocol=protocol)
    plain_state_end = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    assert data.count(plain_state_end) == 1
    return data.replace(plain_state_end, plain_state_end[:-2] + bytes([flags]) + b"t")


@pytest.mark.parametrize("protocol", [2, 4])
def test_dtype_state_cannot_turn_a_float_array_into_an_object_array(
    tmp_path: Path, protocol: int
) -> None:
    # numpy's dtype.__setstate__ takes the flags as given: NPY_ITEM_HASOBJECT (1) would make numpy
    # read the array's bytes as object pointers. All-zero bytes keep the unfixed loader from crashing.
    target = tmp_path / "tensor00001_000"
    target.write_bytes(
        float32_pickle_with_dtype_flags(np.arange(16, dtype=np.float32), 1, protocol)
    )
    array = load_pickle(target)
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float32 and not array.dtype.hasobject
    assert array.tolist() == list(range(16))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.dtype(">f4"), np.dtype("V4")])
def test_dtypes_released_checkpoints_do_not_use_are_refused(
    release: Path, tmp_path: Path, dtype: np.dtype
) -> None:
    planted = copy_of(release, tmp_path)
    target = planted / "ckpt-0" / "tensor00001_000"
    target.write_bytes(pickle.dumps(np.zeros(16, dtype=dtype), protocol=4))
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(planted)
    with pytest.raises(CheckpointError, match="dtype"):
        open_checkpoint(planted).info("final_norm.scale")


def test_truncated_pickle_names_the_file(release: Path, tmp_path: Path) -> None:
    damaged = copy_of(release, tmp_path)
    target = damaged / "ckpt-0" / "tensor00007_000"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"tensor00007_000: corrupt or truncated pickle"):
        load_model(damaged)
    with pytest.raises(CheckpointError, match=r"tensor00007_000"):
        open_checkpoint(damaged).info(open_checkpoint(damaged).names()[7])


def test_garbage_pickle_names_the_file(release: Path, tmp_path: Path) -> None:
    damaged = copy_of(release, tmp_path)
    (damaged / "ckpt-0" / "tensor00003_000").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError, match=r"tensor00003_000: corrupt or truncated"):
        load_model(damaged)


def test_missing_tensor_file_is_named(release: Path, tmp_path: Path) -> None:
    damaged = copy_of(release, tmp_path)
    (damaged / "ckpt-0" / "tensor00005_000").unlink()
    with pytest.raises(CheckpointError, match=r"tensor00005_000 \(transformer/decoder_layer_0/"):
        load_model(damaged)


def test_shape_mismatch_names_the_tensor_and_both_shapes(release: Path, tmp_path: Path) -> None:
    wrong = copy_of(release, tmp_path)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "vocab_size": 128}))
    with pytest.raises(CheckpointError, match=r"embed\.weight: .*\[64, 16\] .*\[128, 16\]"):
        load_model(wrong)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    port = write_hf(dequantized(quantized_model()), tmp_path / "port", "model")
    data = (port / "model.safetensors").read_bytes()
    (port / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_model(port)


def test_port_of_another_size_is_refused(tmp_path: Path) -> None:
    port = write_hf(dequantized(quantized_model()), tmp_path / "port", "transformer")
    with pytest.raises(
        CheckpointError, match=r"of a 2-layer, 8-expert model are missing.*wrong config"
    ):
        open_checkpoint(port, config="grok-tiny")


def test_native_checkpoint_with_missing_tensor_is_refused(tmp_path: Path) -> None:
    model = quantized_model()
    saved = write_native(model, tmp_path / "ours")
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["layers.3.attn.wq.scales"]
    # A new file replaces the old one, whose pages the loaded tensors may still map.
    save_file(tensors, saved / "rewritten.safetensors")
    (saved / "rewritten.safetensors").replace(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.3\.attn\.wq"):
        load_model(saved)


@pytest.mark.parametrize("make", ["missing", "empty", "file", "config only"])
def test_wrong_path_says_what_was_expected(tmp_path: Path, make: str) -> None:
    path = tmp_path / "target"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("hello")
    elif make == "config only":
        path.mkdir()
        TWELVE_LAYERS.to_json(path / "config.json")
    with pytest.raises(CheckpointError, match=r"expected one of: a directory holding ckpt-0/"):
        load_model(path)


def test_bad_arguments_are_named(release: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        load_model(release, dtype="float16")
    with pytest.raises(ValueError, match="quantization must be None or 'int8'"):
        load_model(release, quantization="int4")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_model(release, config="no-such-preset")


def test_header_scan_seeks_over_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "tensor00000_000"
    array = np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32)  # 2 MiB
    path.write_bytes(pickle.dumps(array, protocol=4))

    class CountingFile(io.FileIO):
        read_bytes = 0

        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            CountingFile.read_bytes += len(data)
            return data

    with CountingFile(path, "r") as file:
        header = ScanningUnpickler(SkippingFile(file, path.stat().st_size), path).load()
    assert (header.shape, str(header.dtype), header.nbytes) == ((512, 1024), "float32", 2**21)
    assert CountingFile.read_bytes < 1024
    assert scan_pickle(path).shape == (512, 1024)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "shards/../../x"])
def test_index_entries_outside_the_checkpoint_are_refused(tmp_path: Path, escape: str) -> None:
    port = write_hf(dequantized(quantized_model()), tmp_path / "port", "model", shards=2)
    index_file = port / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    victim = next(iter(index["weight_map"]))
    # The escaping target exists and is a valid shard, so only the path check can refuse it.
    shutil.copy(port / index["weight_map"][victim], tmp_path / "outside.safetensors")
    index["weight_map"][victim] = escape
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"weight_map entry '{victim}' -> '{escape}'"):
        open_checkpoint(port)
