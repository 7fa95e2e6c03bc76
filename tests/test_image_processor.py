"""Parity tests of viscodex_jax.data.image_processor against transformers.

The reference is transformers' ``Qwen2VLImageProcessorPil`` (the processor
Qwen2.5-VL / VisCodex checkpoints resolve to). Tolerance is 1e-6 absolute; the
implementation is meant to be bit-exact, so any real divergence (filter,
rounding, dtype order) shows up as a much larger error.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest

from viscodex_jax.data.chat import expand_image_tokens, num_image_tokens
from viscodex_jax.data.image_processor import (
    ImageProcessorConfig,
    ProcessedImages,
    process_images,
    smart_resize,
)

hf_qwen2vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

ATOL = 1e-6
# What released Qwen2.5-VL checkpoints ship (note max_pixels != class default).
QWEN25_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_rgb(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 0 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency image: keeps big images cheap to make yet exercises the
    bicubic kernel with realistic (non-saturating) gradients."""
    small = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((width, height), PIL.Image.Resampling.BILINEAR))


def _reference(images, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = hf_qwen2vl.Qwen2VLImageProcessorPil(**kwargs)
        out = processor(images=list(images))
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _assert_matches_reference(images, config: ImageProcessorConfig | None = None, **hf_kwargs) -> ProcessedImages:
    ours = process_images(images, config or ImageProcessorConfig())
    ref_pixels, ref_grid = _reference(images, **hf_kwargs)
    assert ours.pixel_values.dtype == np.float32
    assert ours.grid_thw.dtype == np.int64
    np.testing.assert_array_equal(ours.grid_thw, ref_grid)
    assert ours.pixel_values.shape == ref_pixels.shape
    max_diff = float(np.abs(ours.pixel_values - ref_pixels).max())
    assert max_diff <= ATOL, f"max abs diff {max_diff}"
    return ours


# --------------------------------------------------------------------------
# pixel parity


@pytest.mark.parametrize("height,width", [(61, 97), (129, 333), (333, 129), (200, 57)])
def test_odd_sizes_match_transformers(height: int, width: int) -> None:
    image = PIL.Image.fromarray(_random_rgb(_rng(height * 1000 + width), height, width))
    out = _assert_matches_reference([image])
    assert out.pixel_values.shape[1] == 1176


@pytest.mark.parametrize("height,width", [(10, 12), (28, 28)])
def test_tiny_images_are_upscaled_and_match(height: int, width: int) -> None:
    image = PIL.Image.fromarray(_random_rgb(_rng(height + width), height, width))
    out = _assert_matches_reference([image])
    t, gh, gw = out.grid_thw[0]
    assert t == 1
    assert gh * 14 > height and gw * 14 > width
    assert gh * gw * 14 * 14 >= 56 * 56


def test_huge_image_is_downscaled_and_matches() -> None:
    height, width = 3000, 2000
    image = PIL.Image.fromarray(_smooth_rgb(_rng(7), height, width))
    out = _assert_matches_reference([image])
    _, gh, gw = out.grid_thw[0]
    resized_pixels = int(gh * gw) * 14 * 14
    assert resized_pixels <= 28 * 28 * 1280
    assert resized_pixels < height * width // 4  # really downscaled, not just snapped to 28


def test_rgba_pil_is_composited_on_white_like_transformers() -> None:
    rgba = _random_rgb(_rng(11), 45, 70, channels=4)
    rgba[:10, :, 3] = 0  # fully transparent rows must become white, not black
    out = _assert_matches_reference([PIL.Image.fromarray(rgba, mode="RGBA")])
    # Sanity check that alpha was not just dropped.
    dropped = process_images([PIL.Image.fromarray(rgba[..., :3])])
    assert np.abs(out.pixel_values - dropped.pixel_values).max() > 0.1


def test_rgba_numpy_matches_transformers() -> None:
    rgba = _random_rgb(_rng(12), 45, 70, channels=4)
    _assert_matches_reference([rgba])


@pytest.mark.parametrize("mode", ["L", "LA", "P"])
def test_grayscale_and_palette_images_match(mode: str) -> None:
    rng = _rng(13)
    if mode == "L":
        image = PIL.Image.fromarray(_random_rgb(rng, 77, 50, channels=0), mode="L")
    elif mode == "LA":
        image = PIL.Image.fromarray(_random_rgb(rng, 77, 50, channels=2), mode="LA")
    else:
        image = PIL.Image.fromarray(_random_rgb(rng, 77, 50)).convert("P")
        image.info["transparency"] = 0  # palette transparency also triggers compositing
    _assert_matches_reference([image])


def test_grayscale_numpy_2d_equals_single_channel() -> None:
    gray = _random_rgb(_rng(14), 66, 90, channels=0)
    ours_2d = process_images([gray])
    # transformers refuses 2-D arrays; (H, W, 1) is its equivalent.
    ours_hw1 = _assert_matches_reference([gray[..., None]])
    np.testing.assert_array_equal(ours_2d.pixel_values, ours_hw1.pixel_values)
    # Gray means R == G == B before normalisation, so channels differ only by mean/std.
    patch = ours_2d.pixel_values[0].reshape(3, 2, 14, 14)
    std = np.array(ImageProcessorConfig().image_std, dtype=np.float32)
    mean = np.array(ImageProcessorConfig().image_mean, dtype=np.float32)
    unnormalised = patch * std[:, None, None, None] + mean[:, None, None, None]
    np.testing.assert_allclose(unnormalised[0], unnormalised[1], atol=1e-5)


def test_several_images_in_one_call() -> None:
    rng = _rng(15)
    images = [
        PIL.Image.fromarray(_random_rgb(rng, 61, 97)),
        _random_rgb(rng, 120, 45),
        PIL.Image.fromarray(_random_rgb(rng, 30, 30, channels=4), mode="RGBA"),
        PIL.Image.fromarray(_random_rgb(rng, 90, 140, channels=0), mode="L"),
    ]
    out = _assert_matches_reference(images)
    assert out.grid_thw.shape == (4, 3)
    assert out.pixel_values.shape[0] == int(out.grid_thw.prod(axis=1).sum())
    # Each image's block equals processing it alone (no cross-image mixing).
    offsets = np.concatenate([[0], np.cumsum(out.grid_thw.prod(axis=1))])
    for i, image in enumerate(images):
        alone = process_images([image])
        np.testing.assert_array_equal(out.pixel_values[offsets[i] : offsets[i + 1]], alone.pixel_values)


@pytest.mark.parametrize("min_pixels,max_pixels", [(100 * 28 * 28, 200 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28)])
def test_custom_min_max_pixels(min_pixels: int, max_pixels: int) -> None:
    rng = _rng(16)
    images = [PIL.Image.fromarray(_random_rgb(rng, 61, 97)), PIL.Image.fromarray(_random_rgb(rng, 400, 300))]
    config = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    out = _assert_matches_reference(images, config, min_pixels=min_pixels, max_pixels=max_pixels)
    default = process_images(images)
    assert not np.array_equal(out.grid_thw, default.grid_thw)


def test_patch_layout_by_hand() -> None:
    """Independent of transformers: a 56x56 image gives one 2x2 merge window
    and each row is (C, T, ph, pw) of the right 14x14 tile."""
    rgb = _random_rgb(_rng(17), 56, 56)
    out = process_images([rgb])
    np.testing.assert_array_equal(out.grid_thw, [[1, 4, 4]])
    cfg = ImageProcessorConfig()
    norm = (rgb.astype(np.float64) / 255 - np.array(cfg.image_mean)) / np.array(cfg.image_std)
    rows = out.pixel_values.reshape(2, 2, 2, 2, 3, 2, 14, 14)  # gh, gw, mh, mw, C, T, ph, pw
    for gh, gw, mh, mw in np.ndindex(2, 2, 2, 2):
        y, x = (gh * 2 + mh) * 14, (gw * 2 + mw) * 14
        tile = norm[y : y + 14, x : x + 14].transpose(2, 0, 1)
        for t in range(2):
            np.testing.assert_allclose(rows[gh, gw, mh, mw, :, t], tile, atol=1e-5)


def test_empty_sequence() -> None:
    out = process_images([])
    assert out.pixel_values.shape == (0, 1176)
    assert out.grid_thw.shape == (0, 3)


# --------------------------------------------------------------------------
# smart_resize


def test_smart_resize_matches_transformers_on_grid() -> None:
    sizes = [1, 2, 13, 14, 27, 28, 29, 41, 42, 43, 55, 56, 70, 97, 129, 333, 500, 1000, 1023, 2000, 3001]
    settings = [(28, 56 * 56, 28 * 28 * 1280), (28, 3136, 12845056), (28, 64 * 28 * 28, 128 * 28 * 28), (32, 1024, 4096)]
    checked = 0
    for factor, min_pixels, max_pixels in settings:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    continue
                expected = hf_qwen2vl.smart_resize(h, w, factor, min_pixels, max_pixels)
                assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w, factor)
                checked += 1
    assert checked > 1000


def test_smart_resize_defaults_match_transformers() -> None:
    assert smart_resize(3000, 2000) == hf_qwen2vl.smart_resize(3000, 2000)
    assert smart_resize(10, 12) == hf_qwen2vl.smart_resize(10, 12)
    # Python's round-half-to-even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
    assert smart_resize(42, 70, min_pixels=1, max_pixels=10**9) == (56, 56)


@pytest.mark.parametrize("height,width", [(1, 201), (5000, 20)])
def test_smart_resize_rejects_extreme_aspect_ratio(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="aspect ratio") as exc:
        smart_resize(height, width)
    assert f"height={height}" in str(exc.value) and f"width={width}" in str(exc.value)
    with pytest.raises(ValueError):
        hf_qwen2vl.smart_resize(height, width)


def test_smart_resize_accepts_ratio_of_exactly_200() -> None:
    assert smart_resize(1, 200) == hf_qwen2vl.smart_resize(1, 200)


def test_smart_resize_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="height=0"):
        smart_resize(0, 10)


# --------------------------------------------------------------------------
# bad inputs


def test_extreme_aspect_ratio_image_names_index() -> None:
    images = [_random_rgb(_rng(18), 30, 30), _random_rgb(_rng(19), 2, 500)]
    with pytest.raises(ValueError, match=r"image 1: absolute aspect ratio"):
        process_images(images)


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (np.zeros((4, 5, 6, 3), dtype=np.uint8), r"image 1 must have shape"),
        (np.zeros((10,), dtype=np.uint8), r"image 1 must have shape"),
        (np.zeros((10, 10, 2), dtype=np.uint8), r"image 1 must have shape"),
        (np.zeros((0, 10, 3), dtype=np.uint8), r"image 1 is empty"),
        (PIL.Image.new("RGB", (0, 12)), r"image 1 is empty"),
        (np.zeros((10, 10, 3), dtype=np.float32), r"image 1 has dtype float32"),
        (np.full((10, 10, 3), 300, dtype=np.int32), r"image 1 has values outside"),
    ],
)
def test_bad_images_raise_with_index(bad, pattern: str) -> None:
    good = _random_rgb(_rng(20), 30, 30)
    with pytest.raises(ValueError, match=pattern):
        process_images([good, bad])


def test_single_image_not_in_list_is_rejected() -> None:
    with pytest.raises(TypeError, match="sequence"):
        process_images(_random_rgb(_rng(21), 30, 30))  # type: ignore[arg-type]


def test_int64_array_matches_uint8() -> None:
    rgb = _random_rgb(_rng(22), 40, 50)
    np.testing.assert_array_equal(
        process_images([rgb.astype(np.int64)]).pixel_values, process_images([rgb]).pixel_values
    )


# --------------------------------------------------------------------------
# config loading


def test_config_defaults_match_transformers() -> None:
    cfg = ImageProcessorConfig()
    ref = hf_qwen2vl.Qwen2VLImageProcessorPil()
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (
        ref.patch_size,
        ref.temporal_patch_size,
        ref.merge_size,
    )
    assert cfg.image_mean == tuple(ref.image_mean) and cfg.image_std == tuple(ref.image_std)
    assert cfg.patch_dim == 1176


@pytest.mark.parametrize(
    "d",
    [
        QWEN25_VL_PREPROCESSOR,
        {**QWEN25_VL_PREPROCESSOR, "size": {"shortest_edge": 3136, "longest_edge": 12845056}},
        {k: v for k, v in QWEN25_VL_PREPROCESSOR.items() if k not in ("min_pixels", "max_pixels")}
        | {"size": {"shortest_edge": 1000, "longest_edge": 500000}},
        {**QWEN25_VL_PREPROCESSOR, "size": {"shortest_edge": 1, "longest_edge": 2}},  # top-level keys win
    ],
)
def test_from_dict_matches_transformers(d: dict) -> None:
    cfg = ImageProcessorConfig.from_dict(d)
    ref = hf_qwen2vl.Qwen2VLImageProcessorPil(**{k: v for k, v in d.items() if not k.endswith("_class")})
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    assert cfg.image_mean == tuple(ref.image_mean)


def test_from_dict_legacy_size_keys() -> None:
    cfg = ImageProcessorConfig.from_dict({"size": {"min_pixels": 1234, "max_pixels": 56789}})
    assert (cfg.min_pixels, cfg.max_pixels) == (1234, 56789)


@pytest.mark.parametrize(
    "extra,pattern",
    [({"do_normalize": False}, "do_normalize"), ({"resample": 2}, "resample"), ({"rescale_factor": 1.0}, "rescale")],
)
def test_from_dict_rejects_unsupported_settings(extra: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ImageProcessorConfig.from_dict({**QWEN25_VL_PREPROCESSOR, **extra})


def test_from_pretrained(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_PREPROCESSOR))
    cfg = ImageProcessorConfig.from_pretrained(tmp_path)
    assert cfg.max_pixels == 12845056 and cfg.min_pixels == 3136
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageProcessorConfig.from_pretrained(missing)


# --------------------------------------------------------------------------
# placeholder expansion


def test_num_image_tokens() -> None:
    assert num_image_tokens([1, 4, 4]) == 4
    assert num_image_tokens(np.array([1, 22, 36])) == 198
    assert num_image_tokens([2, 4, 6], merge_size=1) == 48


def test_expand_image_tokens_counts() -> None:
    grid = np.array([[1, 4, 4], [1, 6, 10]], dtype=np.int64)
    text = "<|vision_start|><|image_pad|><|vision_end|>a<|vision_start|><|image_pad|><|vision_end|>b"
    out = expand_image_tokens(text, grid)
    first, second = out.split("<|vision_end|>a")
    assert first.count("<|image_pad|>") == 4
    assert second.count("<|image_pad|>") == 15
    assert out.replace("<|image_pad|>", "") == text.replace("<|image_pad|>", "")


def test_expand_image_tokens_uses_processed_grids() -> None:
    rng = _rng(23)
    processed = process_images([_random_rgb(rng, 61, 97), _random_rgb(rng, 10, 12)])
    out = expand_image_tokens("x<|image_pad|>y<|image_pad|>", processed.grid_thw)
    assert out.count("<|image_pad|>") == processed.pixel_values.shape[0] // 4


@pytest.mark.parametrize("n_placeholders,n_images", [(1, 2), (2, 1), (0, 1)])
def test_expand_image_tokens_count_mismatch(n_placeholders: int, n_images: int) -> None:
    text = "q " + "<|image_pad|> " * n_placeholders
    with pytest.raises(ValueError, match=rf"{n_placeholders} .* {n_images} image"):
        expand_image_tokens(text, [[1, 4, 4]] * n_images)
