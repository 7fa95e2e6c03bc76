"""Train state, optimizer and the sharded train step.

State = {"step", "params" (the full tree: frozen and trainable), "opt_state"
(optax state over the trainable params only, float32)}. Gradients are taken
only with respect to the trainable params: a frozen vision tower costs no
gradient memory and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viscodex_jax.utils import flatten, unflatten
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.causal_lm import CausalLM, logical_axes
from viscodex_jax.sharding import activation_sharding, batch_sharding, tree_shardings
from viscodex_jax.train.loss import shifted_targets, token_nll

# Which params train: the paper freezes the vision tower and the merger and trains the LLM.
TRAINABLE_PRESETS = {
    "llm": (r"^model/", r"^lm_head/"),
    "llm+merger": (r"^model/", r"^lm_head/", r"^visual/merger/"),
    "all": (r".*",),
}
_NO_DECAY = (r"/bias$", r"/scale$")  # no weight decay on biases and norm scales


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 10
    total_steps: int = 100
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    # (regex, factor) pairs: a trainable param's update (lr and weight decay alike) is scaled by the factor
    # of the first pattern its path matches; unmatched params keep 1. A fresh vision tower next to a
    # pretrained LLM wants a larger lr than the LLM, whose change should stay small (a task vector).
    lr_scale: Sequence[Sequence[Any]] = ()


def trainable_keys(params: dict[str, Any], patterns: Sequence[str] | str) -> list[str]:
    if isinstance(patterns, str):
        if patterns not in TRAINABLE_PRESETS:
            raise ValueError(f"trainable={patterns!r}: choose from {sorted(TRAINABLE_PRESETS)} or give regexes")
        patterns = TRAINABLE_PRESETS[patterns]
    keys = ["/".join(k) for k in flatten(params)]
    chosen = [k for k in keys if any(re.search(p, k) for p in patterns)]
    if not chosen:
        raise ValueError(f"trainable patterns {list(patterns)} match no parameter")
    return chosen


def make_schedule(c: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps, max(c.total_steps, c.warmup_steps + 1),
                                              end_value=c.lr * c.end_lr_ratio)


def lr_factors(keys: Sequence[str], lr_scale: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Each trainable key's lr factor under ``lr_scale`` (first matching pattern wins; default 1).

    A pattern that matches no trainable key is an error: a typo would otherwise train at the wrong lr."""
    factors = {k: 1.0 for k in keys}
    claimed: set[str] = set()
    for i, entry in enumerate(lr_scale):
        if len(entry) != 2 or not isinstance(entry[0], str) or isinstance(entry[1], bool) \
                or not isinstance(entry[1], (int, float)) or not float(entry[1]) > 0 or entry[1] == float("inf"):
            raise ValueError(f"--config.optim.lr_scale[{i}]={entry!r}: expected a (regex, factor > 0) pair")
        hits = [k for k in keys if re.search(entry[0], k)]
        if not hits:
            raise ValueError(f"--config.optim.lr_scale[{i}]: pattern {entry[0]!r} matches no trainable parameter")
        for k in hits:
            if k not in claimed:
                factors[k] = float(entry[1])
                claimed.add(k)
    return factors


def make_optimizer(c: OptimConfig, keys: Sequence[str]) -> optax.GradientTransformation:
    sched = make_schedule(c)
    decay_mask = {k: not any(re.search(p, k) for p in _NO_DECAY) for k in keys}
    parts = [optax.clip_by_global_norm(c.clip_norm),
             optax.adamw(sched, c.b1, c.b2, c.eps, weight_decay=c.weight_decay, mask=decay_mask)]
    factors = lr_factors(keys, c.lr_scale)
    if any(f != 1.0 for f in factors.values()):  # without groups the optimizer state keeps its old structure
        parts.append(optax.stateless(lambda updates, params=None: {k: u * factors[k] for k, u in updates.items()}))
    return optax.chain(*parts)


def split(params: dict[str, Any], keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    flat = {"/".join(k): v for k, v in flatten(params).items()}
    ks = set(keys)
    return {k: v for k, v in flat.items() if k in ks}, {k: v for k, v in flat.items() if k not in ks}


def join(train: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    return unflatten({tuple(k.split("/")): v for k, v in {**frozen, **train}.items()})


def batch_loss(params: dict[str, Any], batch: dict[str, Any], cfg: ModelConfig, vocab_chunk: int = 8192):
    """(sum of token NLLs, number of target tokens, per-token NLL [B, T]) for one batch."""
    model = CausalLM(cfg)
    seg = batch["segment_ids"]
    kwargs = {}
    if batch.get("pixel_values") is not None:
        kwargs = dict(pixel_values=batch["pixel_values"], vision_meta=batch["vision_meta"])
    hidden = model.apply({"params": params}, batch["input_ids"], batch["positions"], (seg > 0).astype(jnp.int32),
                         segment_ids=seg, return_hidden=True, **kwargs)
    w = params["lm_head"]["kernel"] if "lm_head" in params else params["model"]["embed_tokens"]["embedding"].T
    targets = shifted_targets(batch["labels"], seg)
    nll = token_nll(hidden, w, targets, vocab_chunk)
    return nll.sum(), (targets != -100).sum(), nll


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, keys: Sequence[str],
                    accum_steps: int = 1, skip_nonfinite: bool = False, vocab_chunk: int = 8192,
                    mesh: Mesh | None = None, rules=None):
    """The step function: state, batch (leading [accum_steps, ...] when accumulating) -> state, metrics.

    With ``mesh`` and ``rules``, activations are constrained by the rules while the step is traced.
    """

    def step(state, batch):
        with activation_sharding(mesh, rules if rules is not None else ()):
            return _step(state, batch)

    def _step(state, batch):
        train, frozen = split(state["params"], keys)
        grad_fn = jax.value_and_grad(lambda tr, b: batch_loss(join(tr, frozen), b, cfg, vocab_chunk)[:2],
                                     has_aux=True)

        def micro(carry, b):
            loss_sum, n, grads = carry
            (ls, (cnt)), g = grad_fn(train, b)
            return (loss_sum + ls, n + cnt, jax.tree.map(lambda a, x: a + x.astype(jnp.float32), grads, g)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
        if accum_steps == 1:
            (loss_sum, n, grads), _ = micro((0.0, 0, zeros), batch)
        else:
            (loss_sum, n, grads), _ = jax.lax.scan(micro, (jnp.float32(0.0), jnp.int32(0), zeros), batch)
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        loss = loss_sum / denom  # token mean over the whole (accumulated) batch
        grads = jax.tree.map(lambda g: g / denom, grads)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        train32 = jax.tree.map(lambda x: x.astype(jnp.float32), train)
        updates, opt_state = optimizer.update(grads, state["opt_state"], train32)
        new_train = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), train, updates)
        new_state = {"step": state["step"] + 1, "params": join(new_train, frozen), "opt_state": opt_state}
        if skip_nonfinite:  # keep the old state on a bad step (the step counter still advances)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     {**state, "step": state["step"] + 1})
        metrics = {"loss": loss, "grad_norm": gnorm, "tokens": n, "finite": finite}
        return new_state, metrics

    return step


def init_state(params: dict[str, Any], optimizer: optax.GradientTransformation, keys: Sequence[str]):
    train, _ = split(params, keys)
    return {"step": jnp.int32(0), "params": params,
            "opt_state": optimizer.init(jax.tree.map(lambda x: x.astype(jnp.float32), train))}


def state_shardings(cfg: ModelConfig, abstract_state: Any, mesh: Mesh, rules) -> Any:
    """Shardings for the whole state: params by the logical rules; optimizer moments like their params."""
    pshard = tree_shardings(abstract_state["params"], logical_axes(cfg), mesh, rules)
    by_key = {"/".join(k): v for k, v in flatten(pshard).items()}

    def opt_leaf(path, x):
        for entry in path:
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in by_key:
                return by_key[key]
        return NamedSharding(mesh, P())

    return {"step": NamedSharding(mesh, P()), "params": pshard,
            "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])}


def batch_shardings(batch: dict[str, Any], mesh: Mesh, rules, accum: bool = False) -> dict[str, Any]:
    """Batch arrays sharded on their batch axis (axis 1 of positions [3, B, T]; +1 under accumulation)."""
    def one(path, x):
        name = str(getattr(path[0], "key", ""))
        axis = 1 if name == "positions" and x.ndim == 3 + accum else 0
        return batch_sharding(mesh, rules, x.ndim, axis + accum)

    return jax.tree_util.tree_map_with_path(one, batch)
