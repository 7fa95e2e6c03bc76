"""What keeps a training run from producing silently wrong weights.

* ``check_finite``: names the first parameter holding NaN/Inf (before a
  checkpoint is saved and before an export is written).
* Run identity: at the first start a workdir records which init checkpoint
  (a sampled content fingerprint) and which model shape it was made from;
  a resume with another checkpoint or shape is refused, naming what differs.
* ``check_state_shapes``: a saved step's tensors against the state this
  config builds, so a resume with another depth says which tensor differs
  instead of orbax's advice to restore with ``strict=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
# Values sampled per tensor for the fingerprint: enough that two different
# checkpoints of one shape (another merge weight, another fine-tune) differ,
# cheap enough for a 33B model (a few MB read in total).
_FINGERPRINT_SAMPLES = 4096
_RUNTIME_FIELDS = ("dtype", "attention_impl", "remat_policy")


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss, gradient or parameter."""


class ResumeError(RuntimeError):
    """The workdir was made by a run this config does not match (or cannot be restored)."""


def _key(k) -> Any:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _path_str(path) -> str:
    return "/".join(str(_key(k)) for k in path)


@jax.jit
def _finite_leaves(tree):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def first_nonfinite(params: Any) -> tuple[str, int] | None:
    """(name, count of non-finite values) of the first tensor holding NaN/Inf, or None."""
    ok = jax.device_get(_finite_leaves(params))
    for path, good in jax.tree_util.tree_flatten_with_path(ok)[0]:
        if not bool(good):
            leaf = params
            for k in path:
                leaf = leaf[_key(k)]
            bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(jax.device_get(leaf), np.float32))))
            return _path_str(path), bad
    return None


def check_finite(params: Any, what: str) -> None:
    """Raises NonFiniteError naming the first parameter with NaN/Inf; ``what`` says what was refused."""
    found = first_nonfinite(params)
    if found is not None:
        name, bad = found
        raise NonFiniteError(f"{what}: parameter {name} has {bad} non-finite (NaN/Inf) values")


# ------------------------------------------------------------------------------------------------ identity


def fingerprint(params: dict[str, Any]) -> str:
    """A content fingerprint of a params pytree: names, shapes, dtypes and a strided sample of values."""
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: _path_str(kv[0])):
        x = np.asarray(x)
        h.update(f"{_path_str(path)}:{x.shape}:{x.dtype}\n".encode())
        flat = x.reshape(-1)
        step = max(1, flat.size // _FINGERPRINT_SAMPLES)
        h.update(np.ascontiguousarray(flat[::step][:_FINGERPRINT_SAMPLES]).tobytes())
    return h.hexdigest()[:32]


def model_shape(model_cfg) -> dict[str, Any]:
    """The architecture part of a ModelConfig (run-time settings left out), JSON-ready."""
    d = dataclasses.asdict(model_cfg)
    for k in _RUNTIME_FIELDS:
        d.pop(k, None)
    return json.loads(json.dumps(d))


def run_identity(c, model_cfg, params) -> dict[str, Any]:
    return {
        "init_checkpoint": os.path.abspath(c.model.init_checkpoint),
        "init_fingerprint": fingerprint(params),
        "model": model_shape(model_cfg),
        "param_dtype": str(c.model.param_dtype),
        "trainable": c.train.trainable if isinstance(c.train.trainable, str) else list(c.train.trainable),
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: workdir has {old!r}, this run has {new!r}"]


def check_identity(workdir: str, identity: dict[str, Any], resuming: bool) -> None:
    """Compares with the identity stored in ``workdir``; writes it when there is nothing to resume.

    Raises ResumeError when resuming a workdir made from another init
    checkpoint, model shape, param dtype or trainable set.
    """
    path = os.path.join(workdir, IDENTITY_FILE)
    if resuming and not os.path.isfile(path):
        log.warning("%s has checkpoints but no %s (made before it existed): the init checkpoint cannot be "
                    "verified, only the tensor shapes", workdir, IDENTITY_FILE)
        return
    if resuming:
        with open(path) as f:
            old = json.load(f)
        problems = []
        if old.get("init_fingerprint") != identity["init_fingerprint"]:
            problems.append(f"init checkpoint: workdir was made from {old.get('init_checkpoint')!r} "
                            f"(fingerprint {old.get('init_fingerprint')}), --config.model.init_checkpoint="
                            f"{identity['init_checkpoint']!r} has fingerprint {identity['init_fingerprint']}")
        problems += ["model." + p for p in _diff(old.get("model"), identity["model"])]
        for key in ("param_dtype", "trainable"):
            if old.get(key) != identity[key]:
                problems.append(f"{key}: workdir has {old.get(key)!r}, this run has {identity[key]!r}")
        if problems:
            raise ResumeError(f"{workdir}: cannot resume, this run does not match the one that made the workdir:\n  "
                              + "\n  ".join(problems)
                              + "\nUse a new --config.workdir (or the original init checkpoint and model).")
        return
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(identity, f, indent=1)
        os.replace(tmp, path)


def check_state_shapes(saved: Any, target: Any, where: str) -> None:
    """Raises ResumeError naming the tensors whose saved shape/dtype differs from ``target``'s."""
    def flat(tree):
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape = getattr(leaf, "shape", None)
            if shape is not None:
                out[_path_str(path)] = (tuple(shape), str(getattr(leaf, "dtype", "")))
        return out

    have, want = flat(saved), flat(target)
    problems = []
    for name in sorted(set(have) | set(want)):
        if name not in have:
            problems.append(f"{name}: not in the checkpoint")
        elif name not in want:
            problems.append(f"{name}: in the checkpoint but not in this model")
        elif have[name][0] != want[name][0]:
            problems.append(f"{name}: checkpoint shape {list(have[name][0])}, this model {list(want[name][0])}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ResumeError(f"{where}: the saved train state does not match this config's model: "
                          + "; ".join(problems[:8]) + more
                          + ". Use a new --config.workdir or the model the workdir was made with.")
