"""Qwen2 text decoder: GQA with q/k/v bias, SwiGLU, RMSNorm, (M-)RoPE.

Two layouts of the layer params, one set of modules:

* stacked (``model/layers/...``, every leaf [L, ...]): training and ``init``; the
  layers run as one ``nn.scan`` body (one traced layer, remat per layer).
* per layer (``model/layers_0 ... layers_{L-1}``, from ``causal_lm.unstack_layers``):
  inference; the layers run as a Python loop, each reading its own buffers. On
  XLA:CPU a scan copies every layer's weight slices out of the stacked arrays
  on every step (a dynamic-slice fusion), which a memory-bound decode step pays
  for in full; per-layer buffers are read in place. The KV cache stays one
  [L, B, S, K, hd] array either way: the loop writes each layer's new keys and
  values into it in place.

Both give the same numbers (the same modules on the same values); which one
runs follows from the params given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from viscodex_jax import sharding
from viscodex_jax.model.attention import attention, attention_on_mesh
from viscodex_jax.model.config import TextConfig
from viscodex_jax.model.layers import Dense, RMSNorm, apply_rope
from viscodex_jax.sharding import constrain

Array = jax.Array

_ACT = ("batch", "length", "act_embed")
_save = jax.checkpoint_policies.save_only_these_names
# What each policy keeps between forward and backward (per layer); everything else is recomputed.
# The named ones never keep attention scores, whatever the attention implementation: "dots" and
# "dots_no_batch" keep every matmul output, which with impl="xla" includes the [T, S] logits.
_REMAT_POLICIES = {
    "full": None,  # only the layer inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "qkv": _save("q_proj", "k_proj", "v_proj"),
    "proj": _save("q_proj", "k_proj", "v_proj", "attn_out", "o_proj"),  # attention side saved, MLP recomputed
    "proj_mlp": _save("q_proj", "k_proj", "v_proj", "attn_out", "o_proj", "mlp_gate", "mlp_up", "mlp_down"),
}


def attend(q, k, v, *, impl: str, **kw):
    """``model.attention``; inside an activation-sharding context the kernels run per shard
    (rows over the batch axes, heads over the tensor axis) instead of being gathered. The XLA
    reference stays a plain XLA program that the partitioner shards itself."""
    ctx = sharding.active()
    if ctx is None or impl == "xla":
        return attention(q, k, v, impl=impl, **kw)
    mesh, rules = ctx
    heads = sharding.rule_axes(rules, "act_heads")
    return attention_on_mesh(mesh, q, k, v, batch_axes=sharding.rule_axes(rules, "batch"),
                             head_axis=heads[0] if len(heads) == 1 else None, impl=impl, **kw)


class Attention(nn.Module):
    cfg: TextConfig
    dtype: Any
    impl: str
    layer: int | None = None  # set: the cache is the stacked [L, ...] one and this is its layer

    @nn.compact
    def __call__(self, x, cos, sin, segs, cache=None, cache_index=None):
        c = self.cfg
        hd = c.head_dim
        q = Dense((c.num_heads, hd), dtype=self.dtype, kernel_axes=("embed", "heads", "head_dim"), name="q_proj")(x)
        k = Dense((c.num_kv_heads, hd), dtype=self.dtype, kernel_axes=("embed", "kv_heads", "head_dim"), name="k_proj")(x)
        v = Dense((c.num_kv_heads, hd), dtype=self.dtype, kernel_axes=("embed", "kv_heads", "head_dim"), name="v_proj")(x)
        q = checkpoint_name(constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None)), "q_proj")
        k = checkpoint_name(constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None)), "k_proj")
        v = checkpoint_name(constrain(v, ("batch", "length", "act_kv_heads", None)), "v_proj")
        new_cache = None
        if cache is not None:
            # One write offset for the whole batch: rows are left-padded to a
            # common length by the sampler, so they advance in lockstep.
            if self.layer is None:  # this layer's [B, S, K, hd] (the scan's slice)
                ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
                cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
                new_cache = {"k": ck, "v": cv}
            else:  # only the new entries are written, in place, into the stacked cache
                at = (self.layer, 0, cache_index, 0, 0)
                new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], at),
                             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], at)}
                ck, cv = new_cache["k"][self.layer], new_cache["v"][self.layer]
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        out = attend(q, k, v, q_segment_ids=segs["q"], kv_segment_ids=segs["kv"], causal=True,
                     q_offset=cache_index if cache is not None else 0, impl=self.impl)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), "attn_out")
        out = Dense(c.hidden_size, use_bias=False, axis=2, dtype=self.dtype, kernel_axes=("heads", "head_dim", "embed"),
                    name="o_proj")(out)
        return checkpoint_name(constrain(out, _ACT), "o_proj"), new_cache


class MLP(nn.Module):
    """SwiGLU MLP (text decoder: no bias; vision blocks: with bias)."""

    intermediate_size: int
    hidden_size: int
    use_bias: bool
    dtype: Any
    axes: tuple[str, str] = ()  # (embed, mlp) logical names; empty: not annotated (vision)

    @nn.compact
    def __call__(self, x):
        up_axes = tuple(self.axes)
        down_axes = tuple(reversed(self.axes))
        gate = Dense(self.intermediate_size, use_bias=self.use_bias, dtype=self.dtype, kernel_axes=up_axes,
                     name="gate_proj")(x)
        up = Dense(self.intermediate_size, use_bias=self.use_bias, dtype=self.dtype, kernel_axes=up_axes,
                   name="up_proj")(x)
        if self.axes:  # the text decoder (the vision tower runs per row under vmap: not constrained inside)
            gate = constrain(gate, ("batch", "length", "act_mlp"))
            up = constrain(up, ("batch", "length", "act_mlp"))
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
        out = Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, kernel_axes=down_axes,
                    name="down_proj")(nn.silu(gate) * up)
        if self.axes:
            out = constrain(out, _ACT)
        return checkpoint_name(out, "mlp_down")


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, in the (carry, per-layer input) form nn.scan wants; with ``layer`` set it
    takes the stacked [L, ...] cache and updates its own layer of it (the per-layer loop)."""

    cfg: TextConfig
    dtype: Any
    impl: str
    layer: int | None = None

    @nn.compact
    def __call__(self, x, cache, cos, sin, segs, cache_index):
        c = self.cfg
        x = constrain(x, _ACT)
        h = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",), name="input_layernorm")(x)
        h, new_cache = Attention(c, self.dtype, self.impl, self.layer, name="self_attn")(h, cos, sin, segs, cache, cache_index)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",), name="post_attention_layernorm")(x)
        x = x + MLP(c.intermediate_size, c.hidden_size, False, self.dtype, ("embed", "mlp"), name="mlp")(h)
        return constrain(x, _ACT), new_cache


def remat_policy_names() -> tuple[str, ...]:
    return ("none",) + tuple(_REMAT_POLICIES)


class Decoder(nn.Module):
    """Embeddings + L decoder layers (a scanned body over stacked [L, ...] params, or a loop over per-layer
    params; see the module docstring) + final norm."""

    cfg: TextConfig
    dtype: Any = jnp.float32
    impl: str = "xla"
    remat_policy: str = "none"

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        if self.remat_policy not in remat_policy_names():
            raise ValueError(f"remat_policy must be one of {remat_policy_names()}, got {self.remat_policy!r}")
        layer_cls = DecoderLayer
        if self.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        self.layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype, self.impl)
        # the same layers with per-layer params (created only when called: ``init`` makes the stacked ones)
        self.per_layer = [DecoderLayer(c, self.dtype, self.impl, i, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",))

    def embed(self, input_ids: Array) -> Array:
        return constrain(self.embed_tokens(input_ids).astype(self.dtype), _ACT)

    def __call__(self, x: Array, cos: Array, sin: Array, segs: dict[str, Array], cache=None, cache_index=None):
        """x: embeddings [B, T, D]; segs: {"q": [B, T], "kv": [B, S]} segment ids (see model.attention);
        cache: {'k','v'} stacked [L, B, S, K, hd], written at ``cache_index`` (queries sit there, causally)."""
        if "layers_0" in self.variables.get("params", {}):
            for layer in self.per_layer:
                x, cache = layer(x, cache, cos, sin, segs, cache_index)
            new_cache = cache
        else:
            x, new_cache = self.layers(x, cache, cos, sin, segs, cache_index)
        return constrain(self.norm(x), _ACT), new_cache

    def attend(self, x: Array) -> Array:
        """Tied lm_head: logits from the embedding matrix."""
        return self.embed_tokens.attend(x.astype(self.dtype))
