"""Process-wide test setup."""

from __future__ import annotations

import os

import pytest


def pytest_configure() -> None:
    # Without CUDA the Triton kernels run in Triton's interpreter, which triton reads once, when
    # first imported; torch.compile and FlexAttention import it early, so the flag is set for the
    # whole session before any test can.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A process holds one Ray driver, and the serving tests' shared cluster keeps its driver for
    # the whole session: tests that connect a driver to a Ray cluster of their own run first.
    items.sort(key=lambda item: item.get_closest_marker("own_ray_driver") is None)
