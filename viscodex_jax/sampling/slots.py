"""Continuous batching within static shapes: a fixed number of slots over one KV cache, refilled as rows end.

Layout. The cache is [layers, slots, S, kv_heads, head_dim] with one write
pointer ``w`` shared by all slots; each slot's tokens sit right-aligned at
[w - length, w), and every decode step writes each slot's token at ``w`` and
advances it. Each slot has its own length, RoPE position, token count and
limit, and its own key validity (``kv_valid``), so what a row attends to is
exactly its own prompt and tokens whatever its neighbours; the model's one
scalar cache index (and the causal test ``key slot <= w``) is all it needs.

* insert: a prompt is left-padded to its bucket Pb (its images padded to a
  patch bucket and run through the vision tower), prefilled on its own into a
  [layers, 1, Pb, ...] cache that is written at [w - Pb, w) of its slot; the
  first token is sampled from the prefill logits. One compiled program per
  (prompt bucket, patch bucket).
* decode: a jitted while loop of single-token steps over all slots that
  returns when a slot frees while prompts wait (or the pointer reaches S, or
  ``steps_per_call`` steps ran); one compiled program for every workload.
* rebase: when the pointer reaches S, or an insert needs w >= Pb, every slot
  is rolled along the cache axis by the same (traced) shift. A roll keeps
  each row's slots and validity together; nothing valid wraps because the
  new pointer is at least every active row's length. With S at least twice
  the longest request this happens at most once per S/2 steps.

Tokens are sampled per row with the key ``fold_in(fold_in(key, seed), n)``: the
sampler's key, the request's own seed (``Request.seed``; default its index in the
run) and the step within its row, so a request's sample does not depend on its
slot, its neighbours, the slot count or how a caller cuts the work into runs.

Results are handed over as rows finish: ``run(requests, on_done=...)`` calls
``on_done(index, tokens)`` at once, and ``stream(requests)`` yields
``(index, tokens)`` while pulling requests lazily (a caller can prepare prompts
and images a few at a time and still keep every slot busy).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.config import ConfigError, ModelConfig
from viscodex_jax.sampling import mesh as on_mesh
from viscodex_jax.sampling.loop import DecodeSettings, _prefill_fn, _prepare, check_length
from viscodex_jax.sampling.methods import Greedy, Sampler
from viscodex_jax.sharding import constrain

Array = jax.Array
_ROWS = ("tok", "pos", "n", "limit", "active", "seed")


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    slots: int = 8
    cache_len: int = 2048  # S: cache slots per row, shared by prompt and generated tokens
    max_new_tokens: int = 128  # the default and the largest per-request limit (the output buffer's width)
    prompt_bucket: int = 64
    patch_bucket: int = 256
    steps_per_call: int = 256  # decode steps per call at most (bounds the time between host checks)
    cache_dtype: str = "float32"
    # decode windows: cache_len, cache_len/2, ... (this many sizes, each a compiled decode program); a call
    # runs on the smallest that holds the longest active row plus min(steps_per_call, 32) steps
    windows: int = 3

    def __post_init__(self):
        for name in ("slots", "cache_len", "max_new_tokens", "prompt_bucket", "patch_bucket", "steps_per_call",
                     "windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}={v!r}: expected a positive integer")
        DecodeSettings(cache_dtype=self.cache_dtype)  # the same dtype check
        if self.cache_len < self.prompt_bucket + self.max_new_tokens:
            raise ConfigError(f"cache_len={self.cache_len}: must hold one prompt bucket ({self.prompt_bucket}) plus "
                              f"max_new_tokens={self.max_new_tokens}")


def window_sizes(s: SlotSettings) -> list[int]:
    """The decode windows, smallest first: cache_len halved ``windows - 1`` times (multiples of 8)."""
    return sorted({max(8, -(-s.cache_len // 2**i // 8) * 8) if i else s.cache_len for i in range(s.windows)})


@dataclasses.dataclass
class Request:
    """One prompt: ids [T] with no padding, positions [T] or [3, T], its images' patches and grids."""

    input_ids: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    max_new_tokens: int | None = None
    seed: int | None = None  # the row's sampling seed (0 <= seed < 2**31); None: its index in the run


def requests_from_batch(cfg: ModelConfig, batch: dict[str, Any], max_new_tokens: int | None = None) -> list[Request]:
    """Splits a (left- or right-padded) Processor batch into one Request per row.

    The flat image list is cut by each row's count of image tokens (row-major order, as the Processor
    and transformers lay it out).
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    pos = np.asarray(batch["positions"])
    pix = batch.get("pixel_values")
    grids = [] if batch.get("image_grid_thw") is None else [tuple(int(v) for v in g) for g in batch["image_grid_thw"]]
    unit = cfg.vision.spatial_merge_size**2 if cfg.vision is not None else 1
    out, g, p = [], 0, 0
    for r in range(ids.shape[0]):
        row_ids = ids[r][mask[r]]
        row_pos = pos[:, r][:, mask[r]] if pos.ndim == 3 else pos[r][mask[r]]
        need = int(np.sum(row_ids == cfg.image_token_id)) * unit if cfg.vision is not None else 0
        mine, got = [], 0
        while got < need:
            if g >= len(grids):
                raise ConfigError(f"row {r}: {need // unit} image tokens but the batch's image_grid_thw ran out")
            mine.append(grids[g])
            got += int(np.prod(grids[g]))
            g += 1
        if got != need:
            raise ConfigError(f"row {r}: {need // unit} image tokens do not match its images' grids {mine}")
        req = Request(row_ids.astype(np.int32), row_pos.astype(np.int32), max_new_tokens=max_new_tokens)
        if mine:
            req.pixel_values = np.asarray(pix)[p:p + need]
            req.image_grid_thw = np.asarray(mine)
        p += need
        out.append(req)
    return out


# --------------------------------------------------------------------------------------- programs


def _empty_state(cfg: ModelConfig, s: SlotSettings, pad_id: int) -> dict[str, Any]:
    t = cfg.text
    shape = (t.num_layers, s.slots, s.cache_len, t.num_kv_heads, t.head_dim)
    b = s.slots
    return {
        "cache": {"k": jnp.zeros(shape, s.cache_dtype), "v": jnp.zeros(shape, s.cache_dtype)},
        "kv_valid": jnp.zeros((b, s.cache_len), jnp.int32),
        "tok": jnp.zeros((b,), jnp.int32), "pos": jnp.zeros((b,), jnp.int32), "n": jnp.zeros((b,), jnp.int32),
        "limit": jnp.zeros((b,), jnp.int32), "active": jnp.zeros((b,), bool), "seed": jnp.zeros((b,), jnp.int32),
        "out": jnp.full((b, s.max_new_tokens), pad_id, jnp.int32),
        "w": jnp.zeros((), jnp.int32),
    }


def state_shardings(cfg: ModelConfig, s: SlotSettings, mesh: Mesh, rules) -> dict[str, Any]:
    """The state's NamedShardings by the rules: cache over rows and kv-heads, per-row arrays over rows."""
    shapes = jax.eval_shape(lambda: _empty_state(cfg, s, 0))
    out = {k: on_mesh.row_sharding(mesh, rules, v.shape) for k, v in shapes.items() if k not in ("cache", "w")}
    out["cache"] = {k: on_mesh.cache_sharding(mesh, rules, v.shape) for k, v in shapes["cache"].items()}
    out["w"] = on_mesh.replicated(mesh)
    return out


def _pin(state: dict[str, Any]) -> dict[str, Any]:
    """Keeps the state's layout across calls (inside the activation-sharding context; no-op outside one)."""
    out = dict(state)
    out["cache"] = on_mesh.constrain_cache(state["cache"])
    out["kv_valid"] = constrain(state["kv_valid"], ("batch", "cache_length"))
    out["out"] = constrain(state["out"], ("batch", None))
    for k in _ROWS:
        out[k] = constrain(state[k], ("batch",))
    return out


def _row_keys(key: Array, seed: Array, n: Array) -> Array:
    """Each row's key for its step ``n``: a function of (key, the row's seed, n) only."""
    return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(key, r), i))(seed, n)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "cache_dtype", "mesh", "rules"), donate_argnums=1)
def _insert(params, state, ids, mask, pos, next_pos, extra, row, seed, limit, key, eos, *, cfg, sampler, cache_dtype,
            mesh=None, rules=None):
    """Prefills one prompt [1, Pb] and writes it into slot ``row`` ending at the pointer; samples its first token."""
    pb = ids.shape[1]
    logits, small, _ = _prefill_fn(params, ids, mask, pos, extra, cfg=cfg, cache_len=pb, cache_dtype=cache_dtype,
                                   mesh=mesh, rules=rules)
    first = sampler(logits[0, -1], _row_keys(key, seed[None], jnp.zeros((1,), jnp.int32))[0]).astype(jnp.int32)
    with on_mesh.context(mesh, rules):
        w = state["w"]
        start = w - pb
        st = dict(state)
        st["cache"] = {k: jax.lax.dynamic_update_slice(state["cache"][k], small[k], (0, row, start, 0, 0))
                       for k in small}
        valid = jax.lax.dynamic_update_slice(jnp.zeros((state["kv_valid"].shape[1],), jnp.int32), mask[0], (start,))
        st["kv_valid"] = state["kv_valid"].at[row].set(valid)
        done = jnp.isin(first, eos) | (limit <= 1)
        new = {"tok": first, "pos": next_pos, "n": 1, "limit": limit, "active": ~done, "seed": seed}
        for k, v in new.items():
            st[k] = state[k].at[row].set(jnp.asarray(v, state[k].dtype))
        st["out"] = state["out"].at[row, 0].set(first)  # the rest is read only up to the row's count
        return _pin(st)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "steps", "mrope", "window", "mesh", "rules"),
                   donate_argnums=1)
def _decode(params, state, key, eos, stop_on_free, lo, *, cfg, sampler, steps, mrope, window, mesh=None, rules=None):
    """Up to ``steps`` single-token steps over every slot; stops early when a slot frees and
    ``stop_on_free``, when the pointer reaches the window's end, or when no slot is active.

    The steps run on the cache slots [lo, lo + window) only (every active row lies there): a step's cost
    follows the window, not the whole cache, because the model returns its cache updated out of place.
    """
    b = state["kv_valid"].shape[0]
    model = CausalLM(cfg)
    rows = jnp.arange(b)

    def body(carry):
        i, st, _ = carry
        act, w = st["active"], st["w"]
        kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], act.astype(jnp.int32)[:, None], (0, w))
        p = st["pos"][:, None]
        p = jnp.broadcast_to(p[None], (3, b, 1)) if mrope else p
        logits, cache = model.apply({"params": params}, st["tok"][:, None], p, kv_valid, cache=st["cache"],
                                    cache_index=w)
        new = jax.vmap(sampler)(logits[:, -1], _row_keys(key, st["seed"], st["n"])).astype(jnp.int32)
        col = jnp.minimum(st["n"], st["out"].shape[1] - 1)
        out = st["out"].at[rows, col].set(jnp.where(act, new, st["out"][rows, col]))
        n = st["n"] + act
        ended = act & (jnp.isin(new, eos) | (n >= st["limit"]))
        nxt = dict(st, cache=cache, kv_valid=kv_valid, out=out, n=n, active=act & ~ended,
                   tok=jnp.where(act, new, st["tok"]), pos=st["pos"] + act, w=w + 1)
        return i + 1, _pin(nxt), jnp.any(ended)

    def cond(carry):
        i, st, freed = carry
        return (i < steps) & (st["w"] < window) & jnp.any(st["active"]) & ~(stop_on_free & freed)

    with on_mesh.context(mesh, rules):
        part = dict(state, w=state["w"] - lo, kv_valid=jax.lax.dynamic_slice_in_dim(state["kv_valid"], lo, window, 1),
                    cache={k: jax.lax.dynamic_slice_in_dim(v, lo, window, 2) for k, v in state["cache"].items()})
        _, part, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), _pin(part), jnp.bool_(False)))
        st = dict(part, w=part["w"] + lo,
                  cache={k: jax.lax.dynamic_update_slice_in_dim(state["cache"][k], v, lo, 2)
                         for k, v in part["cache"].items()},
                  # finished rows stop counting as context anywhere (their slots are free for the next insert)
                  kv_valid=jax.lax.dynamic_update_slice_in_dim(
                      state["kv_valid"], jnp.where(part["active"][:, None], part["kv_valid"], 0), lo, 1))
        st["kv_valid"] = jnp.where(st["active"][:, None], st["kv_valid"], 0)
        return _pin(st)


@functools.partial(jax.jit, static_argnames=("mesh", "rules"), donate_argnums=0)
def _rebase(state, shift, *, mesh=None, rules=None):
    """Rolls every slot along the cache axis by ``shift`` (traced: one program for every shift)."""
    with on_mesh.context(mesh, rules):
        st = dict(state)
        st["cache"] = {k: jnp.roll(v, shift, axis=2) for k, v in state["cache"].items()}
        st["kv_valid"] = jnp.roll(state["kv_valid"], shift, axis=1)
        st["w"] = state["w"] + shift
        return _pin(st)


# ------------------------------------------------------------------------------------------ engine


class SlotSampler:
    """Runs requests through ``settings.slots`` slots; ``run`` returns each request's tokens in order.

    Greedy output per request equals generating it alone (and transformers' ``generate``). On a
    ``mesh`` the params are placed by ``rules`` (training's), the slots split over the batch axes and
    the cache over slots and kv-heads; ``settings.slots`` must be a multiple of the batch shards.
    """

    def __init__(self, cfg: ModelConfig, params: Any, eos_ids: Sequence[int], pad_id: int = 0,
                 sampler: Sampler = Greedy(), settings: SlotSettings = SlotSettings(), key: Array | None = None,
                 mesh: Mesh | None = None, rules: Any = None):
        if not isinstance(settings, SlotSettings):
            raise ConfigError(f"settings={settings!r}: expected a SlotSettings")
        self.cfg, self.settings, self.sampler, self.pad_id = cfg, settings, sampler, pad_id
        self.mesh, self.rules = mesh, on_mesh.resolve_rules(mesh, rules)
        shards = on_mesh.batch_shards(mesh, self.rules)
        if settings.slots % shards:
            raise ConfigError(f"slots={settings.slots}: must be a multiple of the mesh's {shards} batch shards "
                              f"(mesh {dict(mesh.shape)})")
        self.params = on_mesh.place_params(cfg, params, mesh, self.rules)
        self.eos, self.key = on_mesh.put_replicated(
            (np.asarray(list(eos_ids), np.int32), jax.random.PRNGKey(0) if key is None else key), mesh)
        state = _empty_state(cfg, settings, pad_id)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(cfg, settings, mesh, self.rules))
        self.state = state
        self._on = dict(mesh=mesh, rules=self.rules)
        self.stats = collections.Counter()

    # -- host-side bookkeeping: which request each slot holds, and how long its row is

    def _prepared(self, req: Request, index: int):
        ids = np.asarray(req.input_ids, np.int32).reshape(1, -1)
        limit = self.settings.max_new_tokens if req.max_new_tokens is None else int(req.max_new_tokens)
        if not 1 <= limit <= self.settings.max_new_tokens:
            raise ConfigError(f"request {index}: max_new_tokens={limit} must be in 1..{self.settings.max_new_tokens} "
                              "(SlotSettings.max_new_tokens)")
        seed = index if req.seed is None else req.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
            raise ConfigError(f"request {index}: seed={req.seed!r} must be an integer in 0..2**31-1")
        check_length(self.cfg, ids.shape[1], limit)
        pos = np.asarray(req.positions, np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": pos[:, None] if pos.ndim == 2
                 else pos[None]}
        if req.pixel_values is not None:
            batch.update(pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw)
        s = self.settings
        ids, mask, pos, next_pos, extra = _prepare(self.cfg, batch, DecodeSettings(
            max_new_tokens=limit, prompt_bucket=s.prompt_bucket, patch_bucket=s.patch_bucket))
        if ids.shape[1] + limit > s.cache_len:
            raise ConfigError(f"request {index}: prompt bucket {ids.shape[1]} + max_new_tokens={limit} exceeds "
                              f"cache_len={s.cache_len}")
        return ids, mask, pos, next_pos, extra, limit, int(seed)

    def _set_pointer(self, target: int, lengths: dict[int, int]):
        w = int(self.state["w"])
        if target == w:
            return
        if lengths:
            self.state = _rebase(self.state, jnp.int32(target - w), **self._on)
            self.stats["rebases"] += 1
        else:  # nothing active: no row to keep, just move the pointer
            self.state["w"] = on_mesh.put_replicated(np.int32(target), self.mesh)

    def run(self, requests: Sequence[Request],
            on_done: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
        """Generates for every request; each result is its tokens up to and including its EOS (if hit).

        Every request is checked before the first one runs. ``on_done(index, tokens)`` is called as soon as
        a request's row finishes (rows finish in any order), before the rest of the run goes on.
        """
        prepared = [self._prepared(r, i) for i, r in enumerate(requests)]
        results: list[np.ndarray | None] = [None] * len(prepared)
        for i, tokens in self._drive(enumerate(prepared)):
            results[i] = tokens
            if on_done is not None:
                on_done(i, tokens)
        return results

    def stream(self, requests: Iterable[Request]) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(index, tokens)`` as each request finishes; requests are pulled (and checked) only as slots
        need them, one ahead, so a long list never has to be prepared, or its images held, at once."""
        return self._drive((i, self._prepared(r, i)) for i, r in enumerate(requests))

    def _drive(self, source: Iterable[tuple[int, tuple]]) -> Iterator[tuple[int, np.ndarray]]:
        s = self.settings
        source = iter(source)
        waiting: collections.deque = collections.deque()  # at most one prepared request, pulled ahead

        def pull():
            if not waiting:
                nxt = next(source, None)
                if nxt is not None:
                    waiting.append(nxt)

        holder: dict[int, int] = {}  # slot -> request index
        bucket: dict[int, int] = {}  # slot -> prompt bucket of its request
        n = np.zeros(s.slots, np.int32)
        mrope = self.cfg.text.mrope_section is not None
        pull()
        while waiting or holder:
            free = [r for r in range(s.slots) if r not in holder]
            while free and waiting:
                row, (i, (ids, mask, pos, next_pos, extra, limit, seed)) = free.pop(0), waiting.popleft()
                lengths = {r: bucket[r] + int(n[r]) - 1 for r in holder}
                if int(self.state["w"]) < ids.shape[1]:
                    self._set_pointer(max([ids.shape[1]] + list(lengths.values())), lengths)
                # one prompt: replicated over the batch axes (its heads still split over the tensor axis)
                ids, mask, pos, extra = on_mesh.put_replicated((ids, mask, pos, extra), self.mesh)
                self.state = _insert(self.params, self.state, ids, mask, pos, jnp.int32(next_pos[0]),
                                     extra, jnp.int32(row), jnp.int32(seed), jnp.int32(limit), self.key, self.eos,
                                     cfg=self.cfg, sampler=self.sampler, cache_dtype=jnp.dtype(s.cache_dtype),
                                     **self._on)
                self.stats["inserts"] += 1
                holder[row], bucket[row] = i, ids.shape[1]
                n[row] = 1
                pull()
            active = np.asarray(self.state["active"])
            if holder and not active[list(holder)].any():
                yield from self._collect(holder, active)
                continue
            lengths = {r: bucket[r] + int(n[r]) - 1 for r in holder if active[r]}
            if int(self.state["w"]) >= s.cache_len:
                nxt = waiting[0][1][0].shape[1] if waiting else 0
                self._set_pointer(max([nxt] + list(lengths.values())), lengths)
            w, longest = int(self.state["w"]), max(lengths.values())
            window = next(x for x in window_sizes(s) if x >= longest + min(s.steps_per_call, 32) or x == s.cache_len)
            lo = min(w - longest, s.cache_len - window)
            self.state = _decode(self.params, self.state, self.key, self.eos, jnp.bool_(bool(waiting)),
                                 jnp.int32(lo), cfg=self.cfg, sampler=self.sampler, steps=s.steps_per_call,
                                 mrope=mrope, window=window, **self._on)
            self.stats["decode_calls"] += 1
            n = np.array(self.state["n"])
            yield from self._collect(holder, np.asarray(self.state["active"]))

    def _collect(self, holder: dict[int, int], active: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(request index, tokens) of the held rows that ended; their slots are free again."""
        done = [r for r in holder if not active[r]]
        if not done:
            return []
        out, n = np.asarray(self.state["out"]), np.asarray(self.state["n"])
        return [(holder.pop(r), out[r, :n[r]].copy()) for r in done]
