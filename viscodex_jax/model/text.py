"""Qwen2 text decoder: GQA with q/k/v bias, SwiGLU, RMSNorm, (M-)RoPE, scanned layers."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from viscodex_jax.model.config import TextConfig
from viscodex_jax.model.layers import Dense, RMSNorm, apply_rope, dot_product_attention

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Attention(nn.Module):
    cfg: TextConfig
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        c = self.cfg
        hd = c.head_dim
        q = Dense((c.num_heads, hd), dtype=self.dtype, kernel_axes=("embed", "heads", "head_dim"), name="q_proj")(x)
        k = Dense((c.num_kv_heads, hd), dtype=self.dtype, kernel_axes=("embed", "kv_heads", "head_dim"), name="k_proj")(x)
        v = Dense((c.num_kv_heads, hd), dtype=self.dtype, kernel_axes=("embed", "kv_heads", "head_dim"), name="v_proj")(x)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            # One write offset for the whole batch: rows are left-padded to a
            # common length by the sampler, so they advance in lockstep.
            ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            new_cache = {"k": ck, "v": cv}
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        out = dot_product_attention(q, k, v, mask, impl=self.impl)
        out = Dense(c.hidden_size, use_bias=False, axis=2, dtype=self.dtype, kernel_axes=("heads", "head_dim", "embed"),
                    name="o_proj")(out)
        return out, new_cache


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
        return Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, kernel_axes=down_axes,
                     name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, in the (carry, per-layer input) form nn.scan wants."""

    cfg: TextConfig
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x, cache, cos, sin, mask, cache_index):
        c = self.cfg
        h = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",), name="input_layernorm")(x)
        h, new_cache = Attention(c, self.dtype, self.impl, name="self_attn")(h, cos, sin, mask, cache, cache_index)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",), name="post_attention_layernorm")(x)
        x = x + MLP(c.intermediate_size, c.hidden_size, False, self.dtype, ("embed", "mlp"), name="mlp")(h)
        return x, new_cache


def remat_policy_names() -> tuple[str, ...]:
    return ("none",) + tuple(_REMAT_POLICIES)


class Decoder(nn.Module):
    """Embeddings + L decoder layers (one scanned body, stacked [L, ...] params) + final norm."""

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
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, ("norm",))

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids).astype(self.dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, cache=None, cache_index=None):
        """x: embeddings [B, T, D]; mask: bool [B, 1, T, S]; cache: {'k','v'} stacked [L, B, S, K, hd]."""
        x, new_cache = self.layers(x, cache, cos, sin, mask, cache_index)
        return self.norm(x), new_cache

    def attend(self, x: Array) -> Array:
        """Tied lm_head: logits from the embedding matrix."""
        return self.embed_tokens.attend(x.astype(self.dtype))
