"""Test images, drawn here: a small chart, random PNGs, and a PNG that only claims to be huge."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def demo_chart(width: int = 160, height: int = 120, seed: int = 0):
    """A small bar chart drawn with PIL: the kind of image VisCodex turns into code."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.line([(15, 10), (15, height - 15), (width - 5, height - 15)], fill="black", width=1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for i, v in enumerate(rng.uniform(0.2, 1.0, 4)):
        x0 = 25 + i * 33
        d.rectangle([x0, height - 15 - v * (height - 30), x0 + 22, height - 16], fill=colors[i])
    return img


def random_png(w: int, h: int, seed: int = 0) -> bytes:
    """PNG bytes of w x h seeded RGB noise."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h RGB pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
