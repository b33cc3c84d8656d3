"""Process-wide test setup."""

from __future__ import annotations

import os


def pytest_configure() -> None:
    # Without CUDA the Triton kernels run in Triton's interpreter, which triton reads once, when
    # first imported; torch.compile and FlexAttention import it early, so the flag is set for the
    # whole session before any test can.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
