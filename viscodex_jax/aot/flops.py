"""FLOPs of a train step three ways: the textbook formula, the program's matmuls, and XLA's count.

* **Formula** (per token of the packed batch). ``6 N`` for the forward and
  backward matmuls of N trainable weights, plus attention: per layer and
  token, Q K^T and P V cost ``2 T d`` each forward (T = row length, d =
  heads x head_dim = d_model), tripled for the backward, so ``12 L T d``
  over L layers (PaLM's appendix B, dense); a causal mask halves the useful
  part, ``6 L T d``. The frozen vision tower adds its forward, ``2 N_vision``
  per image patch. N is given three ways: every parameter (``n_total``), the
  trained ones (``n_trainable``; the LLM for the "llm" preset, embeddings
  included) and the LLM's matmul weights (``n_matmul``, what
  ``train.metrics.train_flops`` counts: the embedding lookup is no matmul).
* **Program** (``jaxpr_matmul_flops``): every ``dot_general`` and
  convolution of the traced step, scan bodies times their length,
  rematerialised forward passes included. This is what the step asks the
  chips to multiply, so the price of a remat policy shows here: it is the
  formula's dense count plus whatever is recomputed.
* **XLA** (``cost_analysis()["flops"]``): the compiled per-chip program.
  XLA's cost analysis counts a while loop's body once, and every scanned
  stack here (decoder layers, vision blocks, vocab chunks, accumulation
  micro-steps) is a while loop, so this figure is far below the step's work.
  It is reported as is, per chip and summed over the chips, for reference.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jcore

from viscodex_jax.model.config import ModelConfig
from viscodex_jax.train.metrics import text_params, vision_params


def _dot_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (contract_l, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[i] for i in contract_l)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    out_feat_dim = dn.rhs_spec[0] if dn is not None else 0
    per_output = math.prod(rhs.shape) // rhs.shape[out_feat_dim]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output // max(1, eqn.params.get("feature_group_count", 1))


def _sub_jaxprs(value: Any):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def count_jaxpr(jaxpr, notes: set[str]) -> int:
    """Matmul FLOPs of a jaxpr: scan bodies x length, cond = its costliest branch, shard_map bodies x shards,
    Pallas kernels x grid, while bodies once (noted)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
            continue
        if name == "cond":
            total += max(count_jaxpr(b.jaxpr, notes) for b in eqn.params["branches"])
            continue
        mult = 1
        if name == "scan":
            mult = int(eqn.params["length"])
        elif name == "while":
            notes.add("a while loop's body is counted once (trip count unknown when tracing)")
        elif name == "shard_map":
            # the body sees one shard and runs once per device along its manual mesh axes
            mesh = eqn.params["mesh"]
            axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or mesh.axis_names
            mult = math.prod(int(mesh.shape[a]) for a in axes)
        elif name == "pallas_call":
            grid = getattr(eqn.params.get("grid_mapping"), "grid", ())
            mult = math.prod(int(g) for g in grid) if grid else 1
            notes.add("Pallas kernels: the kernel body's matmuls times the grid size (blocks a mask skips "
                      "at run time are counted)")
        for v in eqn.params.values():
            for sub in _sub_jaxprs(v):
                total += mult * count_jaxpr(sub, notes)
    return total


def jaxpr_matmul_flops(fn: Callable, *args) -> tuple[int, list[str]]:
    """Global (all chips together) matmul FLOPs of ``fn(*args)``; args may be ShapeDtypeStructs."""
    notes: set[str] = set()
    closed = jax.make_jaxpr(fn)(*args)
    return count_jaxpr(closed.jaxpr, notes), sorted(notes)


def param_counts(cfg: ModelConfig, abstract_params: Any, trainable: list[str]) -> dict[str, int]:
    from viscodex_jax.utils import flatten

    sizes = {"/".join(k): int(np.prod(v.shape)) for k, v in flatten(abstract_params).items()}
    keys = set(trainable)
    return {"n_total": sum(sizes.values()), "n_trainable": sum(v for k, v in sizes.items() if k in keys),
            "n_matmul": text_params(cfg), "n_vision_matmul": vision_params(cfg)}


def formula_per_token(cfg: ModelConfig, counts: dict[str, int], seq_len: int, patches_per_token: float) -> dict:
    """The textbook FLOPs per token (see the module doc); ``patches_per_token``: image patches per text token."""
    t = cfg.text
    attn_dense = 12.0 * t.num_layers * seq_len * t.num_heads * t.head_dim
    vision = 2.0 * counts["n_vision_matmul"] * patches_per_token
    return {
        "6n_total": 6.0 * counts["n_total"],
        "6n_trainable": 6.0 * counts["n_trainable"],
        "6n_matmul": 6.0 * counts["n_matmul"],
        "attention_dense_12LTd": attn_dense,
        "attention_causal_6LTd": attn_dense / 2,
        "vision_forward_2Nv": vision,
        "formula_dense": 6.0 * counts["n_matmul"] + attn_dense + vision,
        "formula_causal": 6.0 * counts["n_matmul"] + attn_dense / 2 + vision,
    }
