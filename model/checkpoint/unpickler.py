"""Reading the release's pickles without running code from them.

Unpickling calls whatever global a pickle names, so a planted pickle can run anything. These
unpicklers admit only the globals that numpy arrays (numpy 1.x and 2.x module names), ml_dtypes'
bfloat16 and the release's `__main__.QuantizedWeight8bit` need, and refuse every other global with an
error naming it. `load_pickle` builds the arrays; `scan_pickle` reads only shapes and dtypes, seeking
over the tensor data.
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


def checked_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.fields is not None:
        raise CheckpointError(
            f"refusing array dtype {dtype}: only plain numeric arrays are tensors"
        )
    return dtype


def latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
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


def frombuffer(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order="F" if order == "F" else "C")


REAL_GLOBALS: dict[str, Any] = {
    "reconstruct": np.ndarray.__reduce__(np.zeros(0))[0],  # numpy's own _reconstruct
    "frombuffer": frombuffer,
    "dtype": checked_dtype,
    "ndarray": np.ndarray,
    "bfloat16": ml_dtypes.bfloat16,
    "quantized": QuantizedRecord,
    "encode": latin1_encode,
}


class Allowlisted:
    """`find_class` for both unpicklers: refuse what the allowlist lacks, resolve the rest."""

    targets: ClassVar[dict[str, Any]]
    path: Path

    def find_class(self, module: str, name: str) -> Any:
        key = admitted_key(module, name)
        if key is None:
            raise refuse(self.path, module, name)
        return self.targets[key]


class RestrictedUnpickler(Allowlisted, pickle.Unpickler):
    targets = REAL_GLOBALS

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self.path = path


def load_pickle(path: Path) -> np.ndarray | QuantizedRecord:
    """One parameter file: a numeric numpy array or a QuantizedRecord of two."""
    with reading(path), open(path, "rb") as file:
        value = RestrictedUnpickler(file, path).load()
    check_value(path, value, lambda v: isinstance(v, np.ndarray))
    return value


# -- metadata scan -----------------------------------------------------------------------------------


class Skipped:
    """Stands for a payload that a scan seeked over."""

    def __init__(self, size: int) -> None:
        self.size = size


class ArrayHeader:
    """What an array unpickles to during a scan: its shape and dtype, no data."""

    shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype("u1")

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        # ndarray state: ([version,] shape, dtype, is_fortran, data)
        shape, dtype = state[-4], state[-3]
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_from_buffer(
    buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str
) -> ArrayHeader:
    header = ArrayHeader()
    header.__setstate__((shape, dtype, order == "F", buffer))
    return header


SCAN_GLOBALS = {
    **REAL_GLOBALS,
    "reconstruct": lambda *args: ArrayHeader(),
    "frombuffer": header_from_buffer,
}


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

    targets = SCAN_GLOBALS
    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: SkippingFile, path: Path) -> None:
        super().__init__(file)
        self.file, self.path = file, path

    def load_frame(self) -> None:
        self.file.in_frame = True
        try:
            super().load_frame()
        finally:
            self.file.in_frame = False

    dispatch[pickle.FRAME[0]] = load_frame


def scan_pickle(path: Path) -> ArrayHeader | QuantizedRecord:
    """Shapes and dtypes of one parameter file, reading its opcodes but not its tensor data."""
    with reading(path), open(path, "rb") as file:
        value = ScanningUnpickler(SkippingFile(file, path.stat().st_size), path).load()
    check_value(path, value, lambda v: isinstance(v, ArrayHeader))
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


def check_value(path: Path, value: Any, is_array: Callable[[Any], bool]) -> None:
    arrays = [value.weight, value.scales] if isinstance(value, QuantizedRecord) else [value]
    for array in arrays:
        if not is_array(array):
            raise CheckpointError(
                f"{path}: expected a numpy array or QuantizedWeight8bit, found {type(array).__name__}"
            )
        if array.dtype.kind not in "fiub" and array.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"{path}: unsupported array dtype {array.dtype}")
