"""Assertions the tests share: bit-identical tensors, and refusals that leave nothing behind."""

from __future__ import annotations

import os

import numpy as np

from viscodex_jax.utils import temp_prefix


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Same names, and per name the same dtype, shape and bytes."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def atomic_leftovers(parent, name: str) -> list[str]:
    """Temp dirs an atomic write of ``<parent>/<name>`` left next to it (``utils.atomic_dir``'s pattern)."""
    prefix = temp_prefix(os.path.join(str(parent), name))
    return [f for f in os.listdir(str(parent)) if f.startswith(prefix)]


def assert_no_output(parent, name: str) -> None:
    """``<parent>/<name>`` was not written, not even partly: no output and no temp dir."""
    parent = str(parent)
    assert not os.path.exists(os.path.join(parent, name)), f"{name} was written"
    assert not atomic_leftovers(parent, name), os.listdir(parent)
