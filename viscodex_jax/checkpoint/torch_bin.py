"""Legacy PyTorch ``.bin``/``.pt`` shards behind the interface of ``SafetensorsFile`` (keys, shape, dtype,
nbytes, view, read), so every header check and loader serves both formats.

``torch.load(mmap=True, weights_only=True)``: the tensors stay memory-mapped (holding every shard of a
checkpoint open costs address space, not RAM) and no pickled code runs.
"""

from __future__ import annotations

import math

import numpy as np

from viscodex_jax.checkpoint.safetensors_io import CheckpointError


def torch_to_numpy(t) -> np.ndarray:
    """A CPU tensor as a numpy array without a copy when it is contiguous (bfloat16 via ml_dtypes)."""
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


class BinFile:
    def __init__(self, path: str):
        import torch

        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, name: str) -> bool:
        return name in self._sd

    def _tensor(self, name: str):
        if name not in self._sd:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._sd[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return torch_to_numpy(self._tensor(name).reshape(-1)[:0]).dtype

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def view(self, name: str) -> np.ndarray:
        return torch_to_numpy(self._tensor(name))

    def read(self, name: str) -> np.ndarray:
        return np.array(self.view(name))
