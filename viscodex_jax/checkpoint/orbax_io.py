"""Our checkpoint directory: orbax params + the HF config.json and side files.

Layout::

    <dir>/params/          orbax (OCDBT) pytree of the params
    <dir>/config.json      the source HF config, so export reproduces it
    <dir>/tokenizer*.json  ... side files copied through from the HF checkpoint

Keeping config.json next to the params makes the directory self-describing:
``vx.load`` needs no flags to rebuild the model, and export needs no source.

``params/`` is what ``ocp.StandardCheckpointer`` writes for a tree of NumPy
arrays (OCDBT, zarr v2, zstd level 1 or, the converter's default, no
compressor: each array's zarr metadata says which, and every restore reads
both), however it was written: ``save_orbax``
saves an in-memory tree; the HF converter streams (``stream.py``), storing big
stacked params as one zarr chunk per layer and naming PyTreeCheckpointHandler
(which StandardCheckpointHandler wraps) in ``_CHECKPOINT_METADATA``. Both
restore to the same arrays with ``load_orbax_params`` or any orbax restore.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from viscodex_jax.checkpoint.hf import copy_side_files
from viscodex_jax.utils import atomic_dir
from viscodex_jax.checkpoint.safetensors_io import CheckpointError

PARAMS_SUBDIR = "params"


def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_SUBDIR)) and os.path.isfile(os.path.join(path, "config.json"))


def write_checkpoint_dir(
    out_dir: str,
    config_json: dict[str, Any],
    write_params: Callable[[str], None],
    side_files_from: str | None = None,
    overwrite: bool = False,
) -> None:
    """Our checkpoint dir, with ``write_params(params_dir)`` writing the orbax part; it appears only when complete."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_params(os.path.join(tmp, PARAMS_SUBDIR))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        copy_side_files(side_files_from, tmp)


def save_orbax(
    params: dict[str, Any],
    config_json: dict[str, Any],
    out_dir: str,
    side_files_from: str | None = None,
    overwrite: bool = False,
    compress: bool = True,
) -> None:
    """Writes params + config + side files; the directory appears only when complete.

    ``compress=False`` stores the zarr chunks without zstd (PyTreeCheckpointHandler, which
    StandardCheckpointer wraps, is the one that takes the option).
    """

    def write_params(path: str) -> None:
        if compress:
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(path, params)
            ckptr.wait_until_finished()
        else:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
                ckptr.save(path, args=ocp.args.PyTreeSave(params))

    write_checkpoint_dir(out_dir, config_json, write_params, side_files_from, overwrite)


def load_orbax_params(ckpt_dir: str, as_numpy: bool = False) -> dict[str, Any]:
    path = os.path.abspath(os.path.join(ckpt_dir, PARAMS_SUBDIR))
    if not os.path.isdir(path):
        raise CheckpointError(f"{ckpt_dir}: not an orbax checkpoint (no {PARAMS_SUBDIR}/ directory)")
    params = ocp.StandardCheckpointer().restore(path)
    if as_numpy:
        params = jax.tree_util.tree_map(np.asarray, params)
    return params
