"""Perceptual color distance (CIEDE2000), shared by the chart and web-page benchmarks.

API:
* ``hex_or_rgb_to_lab(color)`` -> CIE L*a*b* (D65) as ``np.ndarray``: shape (3,) for one
  color, (N, 3) for a sequence of colors.
* ``ciede2000(lab1, lab2)`` -> Delta E 2000; a float for two single colors, an array when
  given arrays of Lab triples (``(..., 3)``, broadcast against each other).
* ``color_similarity(c1, c2)`` -> ``max(0, 1 - dE00 / 100)`` in [0, 1] (the rule Design2Code
  and ChartMimic use); 1.0 means identical colors.
* ``similarity_matrix(colors1, colors2)`` -> pairwise ``color_similarity``, shape (len1, len2)
  (vectorised; for Hungarian matching of color sets).

Accepted colors: ``"#rgb"``, ``"#rrggbb"``, ``"#rrggbbaa"`` (with or without ``#``; alpha
ignored), or RGB(A) triples. Triples of Python/numpy integers, or with any value > 1, are
read on the 0..255 scale; float triples with all values <= 1 on the 0..1 scale.
Only numpy is needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["hex_or_rgb_to_lab", "rgb_to_lab", "ciede2000", "color_similarity", "similarity_matrix", "parse_rgb"]

# sRGB (D65) -> XYZ, and the D65 reference white (Y = 1)
_RGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def parse_rgb(color: Any) -> np.ndarray:
    """One color (hex string or RGB(A) triple) -> float RGB in [0, 1], shape (3,)."""
    if isinstance(color, str):
        h = color.strip().lstrip("#")
        if len(h) in (3, 4):
            h = "".join(c * 2 for c in h[:3])
        if len(h) not in (6, 8):
            raise ValueError(f"not a hex color: {color!r}")
        try:
            return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)], dtype=float) / 255.0
        except ValueError:
            raise ValueError(f"not a hex color: {color!r}") from None
    arr = np.asarray(color)
    if arr.shape not in ((3,), (4,)):
        raise ValueError(f"an RGB(A) color needs 3 or 4 values, got shape {arr.shape}")
    rgb = arr[:3].astype(float)
    if np.issubdtype(arr.dtype, np.integer) or rgb.max() > 1.0:
        rgb = rgb / 255.0
    return np.clip(rgb, 0.0, 1.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], shape (..., 3) -> CIE Lab (D65), shape (..., 3)."""
    rgb = np.asarray(rgb, dtype=float)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _is_single(color: Any) -> bool:
    if isinstance(color, str):
        return True
    arr = np.asarray(color, dtype=object) if not isinstance(color, np.ndarray) else color
    if arr.size == 0:
        return False
    return arr.ndim == 1 and not isinstance(arr.flat[0] if arr.size else None, (str, list, tuple, np.ndarray))


def hex_or_rgb_to_lab(color: Any) -> np.ndarray:
    """A color -> Lab, shape (3,); a sequence of colors -> shape (N, 3)."""
    if _is_single(color):
        return rgb_to_lab(parse_rgb(color))
    colors = list(color)
    if not colors:
        return np.zeros((0, 3))
    return rgb_to_lab(np.stack([parse_rgb(c) for c in colors]))


def ciede2000(lab1: Any, lab2: Any, kL: float = 1.0, kC: float = 1.0, kH: float = 1.0):
    """CIEDE2000 color difference (Sharma, Wu & Dalal 2005), vectorised over ``(..., 3)`` arrays.

    Returns a Python float when both inputs are single Lab triples, else an ndarray.
    """
    a = np.asarray(lab1, dtype=float)
    b = np.asarray(lab2, dtype=float)
    L1, a1, b1 = a[..., 0], a[..., 1], a[..., 2]
    L2, a2, b2 = b[..., 0], b[..., 1], b[..., 2]

    C1 = np.hypot(a1, b1)
    C2 = np.hypot(a2, b2)
    Cbar7 = ((C1 + C2) / 2) ** 7
    G = 0.5 * (1 - np.sqrt(Cbar7 / (Cbar7 + 25.0 ** 7)))
    a1p, a2p = (1 + G) * a1, (1 + G) * a2
    C1p, C2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    h1p = np.where((a1p == 0) & (b1 == 0), 0.0, h1p)
    h2p = np.where((a2p == 0) & (b2 == 0), 0.0, h2p)

    dLp = L2 - L1
    dCp = C2p - C1p
    prod = C1p * C2p
    dh = h2p - h1p
    dhp = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dhp = np.where(prod == 0, 0.0, dhp)
    dHp = 2 * np.sqrt(prod) * np.sin(np.radians(dhp) / 2)

    Lbarp = (L1 + L2) / 2
    Cbarp = (C1p + C2p) / 2
    hsum = h1p + h2p
    hbarp = np.where(np.abs(h1p - h2p) <= 180, hsum / 2, np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2))
    hbarp = np.where(prod == 0, hsum, hbarp)

    T = (1 - 0.17 * np.cos(np.radians(hbarp - 30)) + 0.24 * np.cos(np.radians(2 * hbarp))
         + 0.32 * np.cos(np.radians(3 * hbarp + 6)) - 0.20 * np.cos(np.radians(4 * hbarp - 63)))
    dtheta = 30 * np.exp(-(((hbarp - 275) / 25) ** 2))
    Cbarp7 = Cbarp ** 7
    RC = 2 * np.sqrt(Cbarp7 / (Cbarp7 + 25.0 ** 7))
    SL = 1 + 0.015 * (Lbarp - 50) ** 2 / np.sqrt(20 + (Lbarp - 50) ** 2)
    SC = 1 + 0.045 * Cbarp
    SH = 1 + 0.015 * Cbarp * T
    RT = -np.sin(np.radians(2 * dtheta)) * RC

    tL, tC, tH = dLp / (kL * SL), dCp / (kC * SC), dHp / (kH * SH)
    de = np.sqrt(tL ** 2 + tC ** 2 + tH ** 2 + RT * tC * tH)
    return float(de) if np.ndim(de) == 0 else de


def color_similarity(c1: Any, c2: Any) -> float:
    """Similarity of two colors (hex strings or RGB triples) in [0, 1]: ``max(0, 1 - dE00/100)``."""
    de = ciede2000(hex_or_rgb_to_lab(c1), hex_or_rgb_to_lab(c2))
    return float(max(0.0, 1.0 - de / 100.0))


def similarity_matrix(colors1: Sequence[Any], colors2: Sequence[Any]) -> np.ndarray:
    """Pairwise ``color_similarity`` between two lists of colors, shape (len1, len2)."""
    if len(colors1) == 0 or len(colors2) == 0:
        return np.zeros((len(colors1), len(colors2)))
    lab1 = hex_or_rgb_to_lab(list(colors1))
    lab2 = hex_or_rgb_to_lab(list(colors2))
    de = ciede2000(lab1[:, None, :], lab2[None, :, :])
    return np.clip(1.0 - np.asarray(de) / 100.0, 0.0, 1.0)
