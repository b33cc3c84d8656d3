"""Reading the release's pickles without running code from them.

Unpickling calls whatever global a pickle names, so a planted pickle can run anything. These
unpicklers admit only the globals that numpy arrays (numpy 1.x and 2.x module names), ml_dtypes'
bfloat16 and the release's `__main__.QuantizedWeight8bit` need, and refuse every other global with an
error naming it. Even the admitted numpy globals are stood in for by records that build only plain
float32 / int8 / bfloat16 arrays. `load_pickle` builds the arrays; `scan_pickle` reads only shapes and
dtypes, seeking over the tensor data.
"""

from __future__ import annotations

import codecs
import math
import pickle
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import ml_dtypes
import numpy as np

from grokserve.model.checkpoint.base import CheckpointError

RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
FROMBUFFER_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
# Payloads at least this large are tensor data: a scan seeks over them instead of reading them.
SKIP_AT_LEAST = 4096


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allowlist; nothing it names was called."""


class QuantizedRecord:
    """What `QuantizedWeight8bit` (a dataclass in the reference's `__main__`) unpickles to."""

    weight: Any
    scales: Any

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"QuantizedWeight8bit holds {keys}; expected weight and scales")
        self.weight = state["weight"]
        self.scales = state["scales"]


# What released checkpoints hold: float32 embeddings, norms and routers, int8 matrices, bf16 scales.
TENSOR_DTYPES = (np.dtype(np.float32), np.dtype(np.int8), np.dtype(ml_dtypes.bfloat16))


def tensor_dtype(dtype: np.dtype) -> np.dtype:
    """numpy's own dtype object equal to `dtype`, if it is one a checkpoint tensor may have."""
    for allowed in TENSOR_DTYPES:
        if dtype == allowed and dtype.str == allowed.str:
            return allowed
    raise CheckpointError(
        f"refusing array dtype {dtype}: checkpoint tensors are float32, int8 or bfloat16 "
        "(little-endian)"
    )


class DtypeRecord:
    """What `numpy.dtype(spec, align, copy)` unpickles to.

    The dtype is resolved from the constructor's spec and its state's byte order only, and is one of
    numpy's own TENSOR_DTYPES. numpy's dtype.__setstate__ never runs: a pickle's BUILD could make it
    set arbitrary flags, e.g. mark a float32 dtype as holding objects, so that numpy would read the
    array's bytes as object pointers.
    """

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        self.dtype = tensor_dtype(np.dtype(spec))

    def __setstate__(self, state: Any) -> None:
        # dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags[, meta])
        if not isinstance(state, tuple) or len(state) < 5 or state[2:5] != (None, None, None):
            raise CheckpointError(f"refusing dtype state {state!r}: only plain numeric dtypes")
        byteorder = state[1]
        if byteorder not in ("<", ">", "=", "|"):
            raise CheckpointError(f"refusing dtype byte order {byteorder!r}")
        self.dtype = tensor_dtype(self.dtype.newbyteorder(byteorder))


def resolved_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, DtypeRecord):
        raise CheckpointError(f"an array's dtype is a {type(dtype).__name__}, not numpy.dtype")
    return dtype.dtype


def latin1_encode(text: Any, encoding: str = "utf-8") -> bytes | Skipped:
    # Protocol-2 pickles spell array bytes as `_codecs.encode(text, "latin1")`.
    if encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text if isinstance(text, Skipped) else codecs.encode(text, "latin1")


def admitted_key(module: str, name: str) -> str | None:
    """The allowlist: which admitted global `module.name` is, or None."""
    if name == "_reconstruct" and module in RECONSTRUCT_MODULES:
        return "reconstruct"
    if name == "_frombuffer" and module in FROMBUFFER_MODULES:
        return "frombuffer"
    if module == "numpy" and name in ("dtype", "ndarray"):
        return name
    if name == "bfloat16" and (module == "ml_dtypes" or module.startswith("ml_dtypes.")):
        return "bfloat16"
    if (module, name) == ("__main__", "QuantizedWeight8bit"):
        return "quantized"
    if (module, name) == ("_codecs", "encode"):
        return "encode"
    return None


def refuse(path: Path, module: str, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refusing to unpickle global {module}.{name}: checkpoint pickles may only name "
        "numpy array reconstruction, numpy.dtype, ml_dtypes.bfloat16 and "
        "__main__.QuantizedWeight8bit (a pickle naming anything else could run code)"
    )


class Skipped:
    """Stands for a payload that a scan seeked over."""

    def __init__(self, size: int) -> None:
        self.size = size


class ArrayRecord:
    """What an array unpickles to: its shape and dtype, and its data unless a scan seeked over it.

    The array is built here with `np.frombuffer`, never by numpy's ndarray.__setstate__, so that
    its dtype is always a resolved DtypeRecord.
    """

    shape: tuple[int, ...] = ()
    dtype: np.dtype = TENSOR_DTYPES[0]
    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # ndarray state: ([version,] shape, dtype, is_fortran, data)
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CheckpointError(f"refusing ndarray state of type {type(state).__name__}")
        shape, dtype, fortran, data = state[-4:]
        self.shape, self.dtype = tuple(int(n) for n in shape), resolved_dtype(dtype)
        if isinstance(data, Skipped):
            return
        if not isinstance(data, bytes | bytearray):
            raise CheckpointError(f"refusing array data of type {type(data).__name__}")
        array = np.frombuffer(data, dtype=self.dtype)
        self.array = array.reshape(self.shape, order="F" if fortran else "C")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def from_buffer(buffer: Any, dtype: Any, shape: tuple[int, ...], order: str) -> ArrayRecord:
    record = ArrayRecord()
    record.__setstate__((shape, dtype, order == "F", buffer))
    return record


GLOBALS: dict[str, Any] = {
    "reconstruct": lambda *args: ArrayRecord(),
    "frombuffer": from_buffer,
    "dtype": DtypeRecord,
    "ndarray": np.ndarray,
    "bfloat16": ml_dtypes.bfloat16,
    "quantized": QuantizedRecord,
    "encode": latin1_encode,
}


class Allowlisted:
    """`find_class` for both unpicklers: refuse what the allowlist lacks, resolve the rest."""

    path: Path

    def find_class(self, module: str, name: str) -> Any:
        key = admitted_key(module, name)
        if key is None:
            raise refuse(self.path, module, name)
        return GLOBALS[key]


class RestrictedUnpickler(Allowlisted, pickle.Unpickler):
    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self.path = path


def load_pickle(path: Path) -> np.ndarray | QuantizedRecord:
    """One parameter file: a numeric numpy array or a QuantizedRecord of two."""
    with reading(path), open(path, "rb") as file:
        value = RestrictedUnpickler(file, path).load()
    check_value(path, value)
    if isinstance(value, QuantizedRecord):
        value.weight, value.scales = value.weight.array, value.scales.array
        return value
    return value.array


# -- metadata scan -----------------------------------------------------------------------------------


class SkippingFile:
    """A file view that hands the unpickler small reads and seeks over large payloads."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file, self.size = file, size
        self.in_frame = False  # protocol 4 frames (at most ~64 KiB of small opcodes) are read whole

    def read(self, count: int = -1) -> bytes | Skipped:
        if count < SKIP_AT_LEAST or self.in_frame:
            return self.file.read(count)
        end = self.file.tell() + count
        if end > self.size:
            raise CheckpointError(f"the pickle is truncated: a payload ends at byte {end}")
        self.file.seek(end)
        return Skipped(count)

    def readline(self) -> bytes:
        return self.file.readline()


class ScanningUnpickler(Allowlisted, pickle._Unpickler):
    """The pure-Python unpickler, whose payload reads may return placeholders."""

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: SkippingFile, path: Path) -> None:
        # typeshed's file protocol wants read() -> bytes; the pure-Python unpickler passes a
        # Skipped placeholder through untouched, which is the point of this class.
        super().__init__(file)  # type: ignore[arg-type]
        self.file, self.path = file, path

    def load_frame(self) -> None:
        self.file.in_frame = True
        try:
            super().load_frame()  # type: ignore[misc]  # typeshed omits pickle._Unpickler's methods
        finally:
            self.file.in_frame = False

    dispatch[pickle.FRAME[0]] = load_frame


def scan_pickle(path: Path) -> ArrayRecord | QuantizedRecord:
    """Shapes and dtypes of one parameter file, reading its opcodes but not its tensor data."""
    with reading(path), open(path, "rb") as file:
        value = ScanningUnpickler(SkippingFile(file, path.stat().st_size), path).load()
    check_value(path, value)
    return value


# -- shared ------------------------------------------------------------------------------------------


DAMAGE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    MemoryError,
    OverflowError,
)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns the many ways a damaged pickle fails into one CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        yield
    except CheckpointError:
        raise
    except DAMAGE as error:
        raise CheckpointError(
            f"{path}: corrupt or truncated pickle ({type(error).__name__}: {error})"
        ) from error


def check_value(path: Path, value: Any) -> None:
    arrays = [value.weight, value.scales] if isinstance(value, QuantizedRecord) else [value]
    for array in arrays:
        if not isinstance(array, ArrayRecord):
            raise CheckpointError(
                f"{path}: expected a numpy array or QuantizedWeight8bit, found {type(array).__name__}"
            )
