"""The causal LM: a text decoder plus, for multimodal families, the family's vision tower.

Parameter tree (mirrors the HF on-disk names, layers stacked on axis 0):
    model/embed_tokens/embedding, model/layers/<...>, model/norm/scale,
    lm_head/kernel (absent when embeddings are tied), visual/<...> (VL only).
For inference ``unstack_layers`` turns model/layers into model/layers_0 .. layers_{L-1}
(per-layer buffers; the decoder then runs its layers as a loop, see ``model.text``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.layers import Dense, text_rope
from viscodex_jax.model.text import Decoder

Array = jax.Array


def segments_for(q_len: int, kv_valid: Array, segment_ids: Array | None = None) -> dict[str, Array]:
    """Segment ids for ``model.attention``: {"q": [B, q_len], "kv": [B, S]}; -1 marks key slots to ignore.

    kv_valid: [B, S] (1 for real tokens). Unpacked rows are one segment (0); packed
    rows (no cache, S == q_len) use their ``segment_ids``. Causality is by slot
    index, so with a cache the queries sit at ``cache_index`` (the attention's q_offset).
    """
    valid = kv_valid.astype(bool)
    if segment_ids is None:
        return {"q": jnp.zeros((kv_valid.shape[0], q_len), jnp.int32), "kv": jnp.where(valid, 0, -1).astype(jnp.int32)}
    seg = segment_ids.astype(jnp.int32)
    return {"q": seg, "kv": jnp.where(valid, seg, -1)}


def scatter_image_features(embeds: Array, input_ids: Array, features: Array, image_token_id: int) -> Array:
    """Places feature rows, in order, at the image-pad positions.

    features [N, D]: one list for the whole batch (row-major); [B, N, D]: one list per row.
    """
    is_img = input_ids == image_token_id
    if features.ndim == 3:
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
        rows = jnp.take_along_axis(features, idx[..., None], axis=1)
    else:
        idx = jnp.cumsum(is_img.reshape(-1)) - 1
        rows = features[jnp.clip(idx, 0, features.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(is_img[..., None], rows.astype(embeds.dtype), embeds)


def _tower(cfg: ModelConfig):
    tower = cfg.family.tower
    if tower is None:
        raise ValueError(f"model_type {cfg.model_type!r} has a vision config but its family has no tower")
    return tower


class CausalLM(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        dtype = jnp.dtype(c.dtype)
        self.model = Decoder(c.text, dtype=dtype, impl=c.attention_impl, remat_policy=c.remat_policy)
        if c.vision is not None:
            self.visual = _tower(c).module(c.vision, dtype=dtype, impl=c.attention_impl)
        if not c.text.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, use_bias=False, dtype=dtype, kernel_axes=("embed", "vocab"))

    def encode_images(self, pixel_values: Array, vision_meta: dict[str, Array]) -> Array:
        """[P, patch_dim] -> [P/m^2, D]; or per row (training batches): [B, P, patch_dim] -> [B, P/m^2, D]."""
        return self.visual(pixel_values, vision_meta)

    def embed(self, input_ids, pixel_values=None, vision_meta=None, image_features=None):
        x = self.model.embed(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, vision_meta)
        if image_features is not None:
            x = scatter_image_features(x, input_ids, image_features, self.cfg.image_token_id)
        return x

    def logits_from_hidden(self, h: Array) -> Array:
        if self.cfg.text.tie_word_embeddings:
            return self.model.attend(h)
        return self.lm_head(h)

    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        attention_mask: Array,
        pixel_values: Array | None = None,
        vision_meta: dict[str, Array] | None = None,
        image_features: Array | None = None,
        segment_ids: Array | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | int = 0,
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        """Forward pass.

        input_ids [B, T]; positions [B, T] (Qwen2) or [3, B, T] (M-RoPE);
        attention_mask [B, S] over key slots (S = T without a cache, the cache
        length with one). Returns logits [B, T, V] (or final hidden states;
        ``last_only``: just the last position, [B, 1, V]), plus the updated
        cache when one was given.
        """
        c = self.cfg
        x = self.embed(input_ids, pixel_values, vision_meta, image_features)
        if c.text.mrope_section is not None and positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
        cos, sin = text_rope(positions, c.text.head_dim, c.text.rope_theta, c.text.mrope_section)
        segs = segments_for(input_ids.shape[1], attention_mask, segment_ids)
        h, new_cache = self.model(x, cos, sin, segs, cache, cache_index)
        if last_only:
            h = h[:, -1:]
        out = h if return_hidden else self.logits_from_hidden(h)
        return (out, new_cache) if cache is not None else out


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Random params with the real tree structure (for tests and shape checks)."""
    return nn.meta.unbox(init_boxed(cfg, rng, seq_len))


def init_boxed(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Params with their logical-axis boxes (flax LogicallyPartitioned) where the modules annotate them."""
    model = CausalLM(cfg)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    mask = jnp.ones((1, seq_len), jnp.int32)
    pos = jnp.zeros((1, seq_len), jnp.int32)
    kwargs = {}
    if cfg.vision is not None:
        m = cfg.vision.spatial_merge_size
        meta = _tower(cfg).metadata([(1, 2 * m, 2 * m)], cfg.vision, None)
        kwargs = dict(pixel_values=jnp.zeros((4 * m * m, cfg.vision.patch_dim)), vision_meta=meta)
    return model.init(rng, ids, pos, mask, **kwargs)["params"]


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs, computed without allocating."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Per-param logical PartitionSpecs (None entries: replicated), from the modules' annotations."""
    return nn.get_partition_spec(jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0))))


# ------------------------------------------------------------------------- per-layer params for inference


def layers_unstacked(params: dict[str, Any]) -> bool:
    """Whether the decoder's layer params are per layer (``unstack_layers``) rather than stacked [L, ...]."""
    return "layers_0" in params.get("model", {})


# Backends whose samplers run per-layer params. On CPU the loop is ~2x faster per decode step than the scan
# (benchmarks/decode.py). On TPU, XLA keeps extra copies of the [L, ...] KV cache live across the unrolled
# layers: compile_check of the 7B VL slots program (32 x 8192, bf16 cache, v5e-8) gives 11.95 GiB of
# temporaries per chip against 3.81 with nn.scan, so accelerators keep the stacked layout.
PER_LAYER_BACKENDS = ("cpu",)


def inference_layout(params: dict[str, Any], free: bool = False) -> dict[str, Any]:
    """The layer layout sampling runs on this backend: per layer on CPU (``unstack_layers``), stacked elsewhere."""
    if jax.default_backend() in PER_LAYER_BACKENDS:
        return unstack_layers(params, free=free)
    return params


def unstack_layers(params: dict[str, Any], free: bool = False) -> dict[str, Any]:
    """The params with ``model/layers`` (stacked [L, ...]) split into ``model/layers_0 .. layers_{L-1}``:
    the layout the decoder runs as a loop over per-layer buffers (``model.text``), for inference.

    Leaves may be device arrays (a sharded one keeps its sharding, less the layer axis), numpy arrays
    (views of the stacked array: no copy) or ``ShapeDtypeStruct``s (abstract params, e.g. for AOT
    compilation). ``free``: delete each stacked device array as soon as it is split, so the peak holds
    one leaf twice, never the whole model; only for params nobody else uses (the caller's stacked
    arrays are invalid afterwards). Params already per layer are returned as they are.
    """
    if layers_unstacked(params):
        return params
    model = dict(params["model"])
    stacked = model.pop("layers")
    paths, treedef = jax.tree_util.tree_flatten(stacked)
    n = {int(x.shape[0]) for x in paths}
    if len(n) != 1:
        raise ValueError(f"model/layers: leaves disagree on the layer count {sorted(n)}")
    n_layers = n.pop()
    per_leaf = []
    for x in paths:
        per_leaf.append(_split_layers(x, n_layers))
        if free and isinstance(x, jax.Array):
            x.delete()
    for i in range(n_layers):
        model[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, [parts[i] for parts in per_leaf])
    return {**params, "model": model}


def _split_layers(x: Any, n: int) -> list[Any]:
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)] * n
    if not isinstance(x, jax.Array):
        return [np.asarray(x)[i] for i in range(n)]
    out = None
    if isinstance(x.sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*x.sharding.spec[1:])
        out = (jax.sharding.NamedSharding(x.sharding.mesh, spec),) * n
    return list(_splitter(n, out)(x))


@functools.lru_cache(maxsize=None)
def _splitter(n: int, shardings):
    # one compiled program per (layer count, placement) splits a whole leaf in one call
    return jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=shardings)
