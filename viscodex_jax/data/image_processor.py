"""Qwen2.5-VL image preprocessing in numpy + PIL.

This is a bit-exact reimplementation of transformers' ``Qwen2VLImageProcessorPil``
(the image processor that VisCodex / Qwen2.5-VL checkpoints use), without the
transformers dependency. The pipeline per image is:

    convert to RGB -> smart_resize (PIL bicubic) -> * 1/255 -> (x - mean) / std
    -> duplicate along time to ``temporal_patch_size`` -> patchify

and the output is the flat ``pixel_values`` [sum of patches, C*T*P*P] plus
``grid_thw`` [n_images, 3] that the vision tower consumes.

Exactness notes (why the code looks the way it does):

* The resize is done by PIL on a uint8 image, exactly as transformers does, so
  the resampling filter (bicubic with PIL's antialiasing support) and the
  uint8 clipping/rounding of the result are identical.
* Rescaling multiplies in float64 and only then casts to float32, while
  normalisation runs in float32 with float32 mean/std: both mirror transformers'
  order of operations, so the results match bit for bit rather than to ~1e-7.
* Only integer arrays are accepted: transformers silently rescales float inputs
  in [0, 1] twice (once inside its resize helper, once in ``rescale``), which
  is never what a caller wants, so refusing them is safer than copying that.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageProcessorConfig",
    "ProcessedImages",
    "process_images",
    "smart_resize",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# transformers' class defaults. Note that released Qwen2.5-VL checkpoints
# override max_pixels with 12845056 (= 16384 * 28 * 28) in their
# preprocessor_config.json, so load the checkpoint's config where possible.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_MAX_ASPECT_RATIO = 200
_RESCALE_FACTOR = 1 / 255
_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as stored in HF "resample"


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Return the (height, width) an image of the given size is resized to.

    Both sides become multiples of ``factor`` (patch_size * merge_size), the
    area is brought into [min_pixels, max_pixels] where possible, and the
    aspect ratio is kept as closely as possible. Same arithmetic as
    transformers, including Python's round-half-to-even in the first step and
    the fact that the result can still exceed ``max_pixels`` for very thin
    images (each side is clamped to at least ``factor``).

    Raises:
        ValueError: if a side is not positive or the aspect ratio exceeds 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, got {ratio} "
            f"for an image of height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the Qwen2-VL image processor (defaults = transformers' defaults)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Normalise lists (e.g. from JSON) to tuples so the config stays hashable.
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {len(value)}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this so patches merge evenly."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch (3 * T * P * P, 1176 by default)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        """Build a config from a HF ``preprocessor_config.json`` dict.

        Understands the old top-level ``min_pixels``/``max_pixels`` keys, the
        transformers 5 ``size={"shortest_edge", "longest_edge"}`` dict and a
        legacy ``size={"min_pixels", "max_pixels"}`` dict. Top-level keys win
        over ``size``, as in transformers' constructor. Flags that would switch
        off a step this module always performs are rejected instead of being
        silently ignored.

        Raises:
            ValueError: for settings this implementation does not reproduce.
        """
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if flag in d and not d[flag]:
                raise ValueError(f"{flag}={d[flag]!r} is not supported (only True)")
        if "rescale_factor" in d and not math.isclose(d["rescale_factor"], _RESCALE_FACTOR, rel_tol=1e-12):
            raise ValueError(f"rescale_factor={d['rescale_factor']!r} is not supported (only 1/255)")
        if "resample" in d and d["resample"] is not None and int(d["resample"]) != _PIL_BICUBIC:
            raise ValueError(f"resample={d['resample']!r} is not supported (only {_PIL_BICUBIC}, bicubic)")

        kwargs: dict[str, Any] = {}
        size = d.get("size") or {}
        for key, size_keys in (("min_pixels", ("shortest_edge", "min_pixels")),
                               ("max_pixels", ("longest_edge", "max_pixels"))):
            if d.get(key) is not None:
                kwargs[key] = int(d[key])
            else:
                for size_key in size_keys:
                    if size.get(size_key) is not None:
                        kwargs[key] = int(size[size_key])
                        break
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                kwargs[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            value = d.get(key)
            if value is not None:
                # transformers broadcasts a scalar to every channel.
                kwargs[key] = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(value)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike[str]) -> ImageProcessorConfig:
        """Read ``preprocessor_config.json`` from a checkpoint directory.

        Raises:
            FileNotFoundError: if the file does not exist (the path is named).
        """
        path = os.path.join(os.fspath(checkpoint_dir), "preprocessor_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no preprocessor config found at {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
    """Flat patches for all images plus the (t, h, w) patch grid of each.

    ``pixel_values`` is float32 [sum_i t_i*h_i*w_i, 3*T*P*P]; rows of one image
    are ordered by merge window (so the vision tower can merge 2x2 neighbours
    with a plain reshape). ``grid_thw`` is int64 [n_images, 3].
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray


def _to_rgb_uint8(image: PIL.Image.Image | np.ndarray, index: int) -> np.ndarray:
    """Return an (H, W, 3) uint8 array, converting the way transformers does."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} is empty (size {image.width}x{image.height})")
        # Transparent pixels are composited onto white rather than dropping
        # alpha, otherwise transparent areas would take arbitrary colours.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)

    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index} must be a PIL image or numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {index} must have shape (H, W) or (H, W, C) with C in (1, 3, 4), got {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index} is empty (shape {image.shape})")
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(
            f"image {index} has dtype {image.dtype}; pass integer pixels in [0, 255] "
            "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if image.dtype != np.uint8 and (image.min() < 0 or image.max() > 255):
        raise ValueError(f"image {index} has values outside [0, 255]: [{image.min()}, {image.max()}]")

    channels = image.shape[-1]
    if channels == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 4:
        # Arrays take transformers' float64 blend-and-round path, not PIL's
        # integer alpha_composite, so replicate that formula verbatim.
        alpha = image[..., 3:4] / 255
        composite = alpha * image[..., :3] + (1 - alpha) * 255
        image = np.round(composite)
    return image.astype(np.uint8)


def _patchify(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """(H, W, C) float32 -> [grid_h*grid_w, C*T*P*P] in transformers' order.

    Rows go merge-window by merge-window (gh, gw, mh, mw) and each row is laid
    out as (C, T, ph, pw); the T copies are identical because a still image is
    treated as a clip of ``temporal_patch_size`` equal frames.
    """
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width, channels = image.shape
    grid_h, grid_w = height // p, width // p
    patches = image.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (gh, gw, mh, mw, C, ph, pw)
    patches = patches.transpose(0, 3, 1, 4, 6, 2, 5)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return patches.reshape(grid_h * grid_w, channels * t * p * p)


def process_images(
    images: Sequence[PIL.Image.Image | np.ndarray],
    config: ImageProcessorConfig = ImageProcessorConfig(),
) -> ProcessedImages:
    """Preprocess images exactly like transformers' ``Qwen2VLImageProcessorPil``.

    Args:
        images: PIL images (any mode; alpha is composited onto white) or
            integer numpy arrays in [0, 255] shaped (H, W) or channels-last
            (H, W, C) with C in (1, 3, 4).
        config: processor settings; use ``ImageProcessorConfig.from_pretrained``
            to match a checkpoint.

    Returns:
        The concatenated patches and per-image grids. An empty sequence gives
        [0, patch_dim] and [0, 3] arrays.

    Raises:
        TypeError: if ``images`` is a single image instead of a sequence.
        ValueError: for a malformed image (the message names its index) or an
            aspect ratio above 200.
    """
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        raise TypeError("process_images expects a sequence of images; wrap a single image in a list")

    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    all_patches: list[np.ndarray] = []
    grids: list[tuple[int, int, int]] = []
    for index, image in enumerate(images):
        rgb = _to_rgb_uint8(image, index)
        height, width = rgb.shape[:2]
        try:
            new_h, new_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
        except ValueError as e:
            raise ValueError(f"image {index}: {e}") from e
        # PIL returns a copy when the size is unchanged, so always calling
        # resize is both exact and simple.
        resized = PIL.Image.fromarray(rgb).resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
        pixels = np.asarray(resized).astype(np.float64) * _RESCALE_FACTOR
        pixels = (pixels.astype(np.float32) - mean) / std
        all_patches.append(_patchify(pixels, config))
        grids.append((1, new_h // config.patch_size, new_w // config.patch_size))

    if not all_patches:
        return ProcessedImages(
            pixel_values=np.zeros((0, config.patch_dim), dtype=np.float32),
            grid_thw=np.zeros((0, 3), dtype=np.int64),
        )
    return ProcessedImages(
        pixel_values=np.concatenate(all_patches, axis=0),
        grid_thw=np.asarray(grids, dtype=np.int64),
    )
