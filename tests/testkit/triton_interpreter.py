"""Running Triton kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).

Triton reads the flag when it decorates a function, its own library's functions included, so the flag
must be set before the process first imports triton. Anything that imports triton (FlexAttention's
eager path does) should therefore run inside `interpreter_flag()` too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import pytest


def imported_for_hardware() -> bool:
    """triton is loaded with its library compiled for a GPU rather than for the interpreter."""
    if "triton" not in sys.modules:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(sys.modules["triton"].language.cdiv, InterpretedFunction)


@contextlib.contextmanager
def interpreter_flag() -> Iterator[None]:
    """Sets TRITON_INTERPRET=1 for the block; skips where CUDA is present (the `gpu` tests run the
    compiled kernels there, and one process cannot hold both builds)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the gpu tests cover the compiled kernels")
    if imported_for_hardware():
        pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 was set")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
