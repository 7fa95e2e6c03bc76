"""Building blocks shared by the text decoder and the vision tower."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics, cast back before the scale (as HF does)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axes: tuple[str, ...] = ()  # logical axis names of the scale (for sharding rules)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, self.axes) if self.axes else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class Dense(nn.Module):
    """Dense over the trailing axis with an arbitrary kernel shape.

    ``features`` may be a tuple so q/k/v kernels keep a ``heads`` axis that
    sharding rules can name; ``axis`` > 1 contracts several input axes (o_proj).
    """

    features: int | Sequence[int]
    use_bias: bool = True
    axis: int = 1  # number of trailing input axes to contract
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    # Logical axis names (e.g. ("embed", "heads", "head_dim")): sharding rules in the config map them to mesh axes.
    kernel_axes: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[-self.axis :]
        kinit, binit = self.kernel_init, nn.initializers.zeros
        if self.kernel_axes:
            kinit = nn.with_logical_partitioning(kinit, self.kernel_axes)
            binit = nn.with_logical_partitioning(binit, self.kernel_axes[len(in_shape):])
        kernel = self.param("kernel", kinit, in_shape + feats, jnp.float32)
        n_in, n_out = len(in_shape), len(feats)
        lhs = "".join(chr(ord("a") + i) for i in range(n_in))
        out = "".join(chr(ord("n") + i) for i in range(n_out))
        y = jnp.einsum(f"...{lhs},{lhs}{out}->...{out}", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", binit, feats, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [..., T, H, D]; cos/sin: [..., T, D] in float32. Rotation done in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
    return y.astype(x.dtype)


def text_rope(positions: Array, head_dim: int, theta: float, mrope_section: Sequence[int] | None):
    """cos/sin [B, T, head_dim] for 1-D positions [B, T] or M-RoPE positions [3, B, T].

    M-RoPE: the head_dim/2 frequencies are split into sections (t, h, w) and
    section i takes its angle from position axis i, as in Qwen2.5-VL.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if positions.ndim == 2:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    else:
        if mrope_section is None:
            raise ValueError("3-axis positions given but the model has no mrope_section")
        freqs3 = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, D/2]
        axis_of_freq = []
        for i, n in enumerate(mrope_section):
            axis_of_freq += [i % 3] * n
        sel = jax.nn.one_hot(jnp.array(axis_of_freq), 3, dtype=jnp.float32)  # [D/2, 3]
        freqs = jnp.einsum("abtf,fa->btf", freqs3, sel)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
