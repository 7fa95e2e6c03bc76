"""Qwen2.5-VL: the vision tower (patch embed, 2-D RoPE, window/full attention, patch merger), the
M-RoPE position index of its prompts, and the family entry that names them (``FAMILY``, at the end).

Everything that depends on the image sizes (the window reordering, the segment
ids that make window and per-image attention block-diagonal, the rotary
coordinates) is computed on the host in numpy by :func:`vision_metadata`, so the
jitted tower sees fixed-shape arrays and only recompiles when the total patch
count changes. Patches can be padded to a bucket (``pad_to``): padded patches
get segment id -1 and never attend or get attended.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.data.chat import QWEN_CHATML
from viscodex_jax.model.config import (ConfigError, ModelConfig, VisionConfig, read_int, parse_text_config,
                                       parse_vision_config, text_section)
from viscodex_jax.model.families.base import Family, HFNames, Tower
from viscodex_jax.model.layers import Dense, RMSNorm, apply_rope
from viscodex_jax.model.text import MLP, attend
from viscodex_jax.sharding import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisionMetadata:
    """Host-computed, shape-static inputs of the tower for a list of image grids.

    All per-patch arrays are already in window order (the order the blocks run in).
    """

    window_perm: np.ndarray  # [P] patch order for window attention (index into input patches)
    merged_inverse: np.ndarray  # [P/m^2] restores merged tokens to input order
    window_segments: np.ndarray  # [P] window id per patch, -1 for padding
    image_segments: np.ndarray  # [P] image-frame id per patch, -1 for padding
    rotary_pos: np.ndarray  # [P, 2] (h, w) coordinate per patch
    num_valid_tokens: int  # merged tokens that are real (the rest is padding)


def _window_order(t: int, gh: int, gw: int, unit_win: int):
    """Merge-unit order and window lengths for one image (as transformers' get_window_index)."""
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h = (-gh) % unit_win
    pad_w = (-gw) % unit_win
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    nh, nw = (gh + pad_h) // unit_win, (gw + pad_w) // unit_win
    win = padded.reshape(t, nh, unit_win, nw, unit_win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
    lengths = (win >= 0).sum(-1).reshape(-1)
    order = win.reshape(-1)
    return order[order >= 0], lengths[lengths > 0]


def vision_metadata(grid_thw: Sequence[Sequence[int]], cfg: VisionConfig, pad_to: int | None = None) -> VisionMetadata:
    """Computes the tower's index arrays for images with grids ``grid_thw`` (in patches)."""
    m = cfg.spatial_merge_size
    unit = m * m
    unit_win = cfg.window_size // m // cfg.patch_size
    unit_perm, win_ids, img_ids, rot = [], [], [], []
    unit_offset = win_offset = 0
    for i, (t, h, w) in enumerate(np.asarray(grid_thw, dtype=np.int64).tolist()):
        if h % m or w % m:
            raise ValueError(f"image {i}: grid {h}x{w} is not divisible by spatial_merge_size {m}")
        gh, gw = h // m, w // m
        order, lengths = _window_order(t, gh, gw, unit_win)
        unit_perm.append(order + unit_offset)
        # window id of every merge unit in window order, expanded to its m*m patches
        win_ids.append(np.repeat(np.arange(len(lengths)) + win_offset, lengths * unit))
        img_ids.append(np.repeat(np.arange(t) + (img_ids[-1].max() + 1 if img_ids else 0), h * w))
        # (h, w) of each patch in the processor's order: merge blocks row-major, 2x2 inside
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (gh, m, gw, m)
        hw = np.stack([hh.reshape(blk).transpose(0, 2, 1, 3).ravel(), ww.reshape(blk).transpose(0, 2, 1, 3).ravel()], -1)
        rot.append(np.tile(hw, (t, 1)))
        unit_offset += t * gh * gw
        win_offset += len(lengths)
    # No images (a packed row of text records): all padding.
    unit_perm = np.concatenate(unit_perm) if unit_perm else np.zeros(0, np.int64)
    n_units = len(unit_perm)
    n_patches = n_units * unit
    total = n_patches if pad_to is None else pad_to
    if total < n_patches or total % unit:
        raise ValueError(f"pad_to={pad_to} must be >= {n_patches} patches and a multiple of {unit}")
    patch_perm = (unit_perm[:, None] * unit + np.arange(unit)).reshape(-1)
    img_seg = np.concatenate(img_ids or [np.zeros(0, np.int64)])[patch_perm]
    rot_pos = np.concatenate(rot or [np.zeros((0, 2), np.int64)])[patch_perm]
    win_seg = np.concatenate(win_ids or [np.zeros(0, np.int64)])
    pad = total - n_patches
    patch_perm = np.concatenate([patch_perm, np.arange(n_patches, total)])
    merged_inverse = np.concatenate([np.argsort(unit_perm), np.arange(n_units, total // unit)])
    return VisionMetadata(
        window_perm=patch_perm.astype(np.int32),
        merged_inverse=merged_inverse.astype(np.int32),
        window_segments=np.concatenate([win_seg, -np.ones(pad, np.int64)]).astype(np.int32),
        image_segments=np.concatenate([img_seg, -np.ones(pad, np.int64)]).astype(np.int32),
        rotary_pos=np.concatenate([rot_pos, np.zeros((pad, 2), np.int64)]).astype(np.int32),
        num_valid_tokens=n_units,
    )


_ACT = ("batch", "length", "act_embed")


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x, is_full, cos, sin, window_segments, image_segments):
        c = self.cfg
        h = RMSNorm(1e-6, self.dtype, name="norm1")(x)
        # Full-attention blocks are a per-layer flag, so one scanned block serves all.
        segments = jnp.where(is_full, image_segments, window_segments)
        x = constrain(x + _Attn(c, self.dtype, self.impl, name="attn")(h, cos, sin, segments), _ACT)
        h = RMSNorm(1e-6, self.dtype, name="norm2")(x)
        x = constrain(x + MLP(c.intermediate_size, c.hidden_size, True, self.dtype, name="mlp")(h), _ACT)
        return x, None


class _Attn(nn.Module):
    cfg: VisionConfig
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x, cos, sin, segments):
        c = self.cfg
        b, n = x.shape[:2]
        qkv = Dense(3 * c.hidden_size, dtype=self.dtype, name="qkv")(x).reshape(b, n, 3, c.num_heads, c.head_dim)
        q = apply_rope(qkv[:, :, 0], cos, sin)
        k = apply_rope(qkv[:, :, 1], cos, sin)
        out = attend(q, k, qkv[:, :, 2], q_segment_ids=segments, kv_segment_ids=segments, causal=False, impl=self.impl)
        return Dense(c.hidden_size, dtype=self.dtype, name="proj")(out.reshape(b, n, c.hidden_size))


class PatchMerger(nn.Module):
    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        d = c.hidden_size * c.spatial_merge_size**2
        x = RMSNorm(1e-6, self.dtype, name="ln_q")(x).reshape(x.shape[0], -1, d)
        x = Dense(d, dtype=self.dtype, name="mlp_0")(x)
        x = nn.gelu(x, approximate=False)
        return Dense(c.out_hidden_size, dtype=self.dtype, name="mlp_2")(x)


class VisionTower(nn.Module):
    """pixel_values [P, C*T*p*p] (the processor's patch order) -> merged tokens [P/m^2, out_hidden];
    or one list of patches per row: [B, P, C*T*p*p] with metadata [B, ...] -> [B, P/m^2, out_hidden].

    Rows are a real batch axis (not a vmap), so attention kernels and sharding
    constraints see it: a training batch's towers stay sharded like its rows.
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, pixel_values: Array, meta: dict[str, Array]) -> Array:
        c = self.cfg
        single = pixel_values.ndim == 2
        if single:
            pixel_values, meta = pixel_values[None], {k: v[None] for k, v in meta.items()}
        x = jnp.take_along_axis(pixel_values, meta["window_perm"][..., None], axis=1)
        # Conv3d with stride == kernel over flattened patches is exactly a matmul.
        x = constrain(_PatchEmbed(c, self.dtype, name="patch_embed")(x), _ACT)
        inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, c.head_dim // 2, 2, dtype=jnp.float32) / (c.head_dim // 2)))
        freqs = meta["rotary_pos"].astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, hd/4]
        freqs = freqs.reshape(freqs.shape[:2] + (-1,))
        emb = jnp.concatenate([freqs, freqs], -1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        is_full = jnp.zeros((c.depth,), bool).at[jnp.array(c.fullatt_block_indexes, jnp.int32)].set(True)
        blocks = nn.scan(
            VisionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.depth,
        )(c, self.dtype, self.impl, name="blocks")
        x, _ = blocks(x, is_full, cos, sin, meta["window_segments"], meta["image_segments"])
        merged = PatchMerger(c, self.dtype, name="merger")(x)
        merged = jnp.take_along_axis(merged, meta["merged_inverse"][..., None], axis=1)
        return merged[0] if single else merged


class _PatchEmbed(nn.Module):
    cfg: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        return Dense(self.cfg.hidden_size, use_bias=False, dtype=self.dtype, name="proj")(x)


def metadata_arrays(meta: VisionMetadata) -> dict[str, np.ndarray]:
    """The array part of the metadata, as the tower's ``meta`` argument."""
    return {
        "window_perm": meta.window_perm,
        "merged_inverse": meta.merged_inverse,
        "window_segments": meta.window_segments,
        "image_segments": meta.image_segments,
        "rotary_pos": meta.rotary_pos,
    }


# M-RoPE position ids for Qwen2.5-VL prompts, computed on the host.
#
# Text tokens advance all three axes (t, h, w) together; the image-pad tokens of
# one image get (t, row, col) coordinates on the merged grid offset by the text
# position before it, and the text after an image resumes at
# ``start + max(rows, cols)``. Padding (attention_mask == 0) gets position 0.
# Images are consumed from ``image_grid_thw`` in order across the whole batch,
# as transformers' ``get_rope_index`` does.


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    image_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (positions [3, B, T] int32, deltas [B] int32).

    ``deltas[b]`` is max position + 1 - number of valid tokens: what a decoder
    adds to the plain token index to continue row b's positions.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int64).tolist())
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        pos = np.zeros((3, len(ids)), np.int64)
        cur = 0
        i = 0
        while i < len(ids):
            if ids[i] != image_token_id:
                pos[:, i] = cur
                cur += 1
                i += 1
                continue
            try:
                gt, gh, gw = next(grids)
            except StopIteration:
                raise ValueError(
                    f"row {row}: more <|image_pad|> runs than images in image_grid_thw"
                ) from None
            lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
            n = gt * lh * lw
            run = ids[i : i + n]
            if len(run) < n or np.any(run != image_token_id):
                raise ValueError(
                    f"row {row}: image with grid {(gt, gh, gw)} needs {n} consecutive image tokens at "
                    f"position {i}, found {int(np.sum(run == image_token_id))}"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i : i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur
            cur += max(lh, lw)
            i += n
        positions[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    leftover = sum(1 for _ in grids)
    if leftover:
        raise ValueError(f"{leftover} image(s) in image_grid_thw have no <|image_pad|> tokens in input_ids")
    return positions.astype(np.int32), deltas.astype(np.int32)


# ---------------------------------------------------------------- the family entry

def parse_config(d: Mapping[str, Any], where: str, runtime: dict[str, Any]) -> ModelConfig:
    if "vision_config" not in d:
        raise ConfigError(f"{where}: model_type qwen2_5_vl needs a vision_config")
    text_d, text_where = text_section(d, where)
    text = parse_text_config(text_d, d, text_where, where)
    if text.mrope_section is None:
        raise ConfigError(f"{where}: qwen2_5_vl needs rope mrope_section")
    vision = parse_vision_config(d["vision_config"], where + ":vision_config")
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(
            f"{where}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
        )
    return ModelConfig(
        model_type="qwen2_5_vl",
        text=text,
        vision=vision,
        image_token_id=read_int(d, where, "image_token_id", default=151655, lo=0),
        video_token_id=read_int(d, where, "video_token_id", default=151656, lo=0),
        vision_start_token_id=read_int(d, where, "vision_start_token_id", default=151652, lo=0),
        vision_end_token_id=read_int(d, where, "vision_end_token_id", default=151653, lo=0),
        **runtime,
    )


def rope_index(input_ids, grids, attention_mask, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    return get_rope_index(input_ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size, attention_mask)


def tower_metadata(grids, cfg: VisionConfig, pad_to: int | None = None) -> dict[str, np.ndarray]:
    return metadata_arrays(vision_metadata(grids, cfg, pad_to))


def _hf_kernel_shape(path: tuple[str, ...], flax_shape: tuple[int, ...], cfg: ModelConfig):
    """The patch embedding is a Conv3d in HF ([out, C, T, p, p]); ours is the equivalent matmul."""
    if path[-3:-1] == ("patch_embed", "proj"):
        v = cfg.vision
        return (flax_shape[-1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return None


FAMILY = Family(
    model_type="qwen2_5_vl",
    parse_config=parse_config,
    rope_index=rope_index,
    chat_template=QWEN_CHATML,
    hf_names=HFNames(
        # transformers' in-memory names (and older releases') for the on-disk ones
        aliases=((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."),
                 (r"^language_model\.model\.", "model."), (r"^language_model\.lm_head\.", "lm_head.")),
        stacked=("layers", "blocks"),
        sequential=("merger",),
        kernel_shape=_hf_kernel_shape,
    ),
    tower=Tower(module=VisionTower, metadata=tower_metadata),
)
