"""Reading and validating MCD (Multimodal Coding Dataset) records.

MCD ships as one JSON list (``mcd_598k.json``) or JSONL of records::

    {"images": ["mcd_images/chart_images/92.png"],
     "messages": [{"role": "user", "content": "<image>\\nYou are an expert Python developer ..."},
                  {"role": "assistant", "content": "import matplotlib.pyplot as plt\\n..."}],
     "category": "chart"}

Each ``<image>`` tag in a system/user turn marks where the next entry of
``images`` goes. Assistant turns are taken literally: generated HTML/SVG may
contain an ``<image>`` element, which is code, not a placeholder. Image paths
are relative to the JSON file's folder; the images may instead live inside
``mcd_images.zip`` next to it (read lazily, one handle per process).

Everything here runs on the host, before any jitted code: a bad record becomes
an :class:`MCDRecordError` naming the file, the record index and the problem,
and ``on_error="skip"`` turns it into a logged, counted skip (:class:`SkipStats`).

Images are size-checked from their header before any pixel is decoded
(:func:`decode_image`), so a small file declaring a huge canvas costs
nothing; PIL's own decompression-bomb limit is set explicitly as a backstop
above every limit this module allows.
"""

from __future__ import annotations

import collections
import io
import json
import os
import threading
import zipfile
from typing import Any, Iterator, Mapping, Sequence

import PIL.Image
from absl import logging

__all__ = [
    "ALLOWED_ROLES",
    "IMAGE_TAG",
    "MCDFileError",
    "MCDRecordError",
    "NoValidRecordError",
    "ImageStore",
    "SkipStats",
    "check_messages",
    "check_on_error",
    "decode_image",
    "decode_limit",
    "iter_valid",
    "load_images",
    "read_records",
    "validate_records",
]

IMAGE_TAG = "<image>"
ALLOWED_ROLES = ("system", "user", "assistant")
# Tag-bearing roles: where ``<image>`` is a placeholder rather than code.
_TAG_ROLES = ("system", "user")
# Special-token strings that would corrupt the chat template or the image spans
# if they appeared literally in a record's text (the tokenizer would parse them).
_FORBIDDEN_IN_TEXT = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# A decoded image is resized to at most the processor's max_pixels anyway, so
# more than 16x that (4x per side) buys nothing and only costs memory: 16 x
# the default 1,003,520 is ~16M pixels (48 MB of RGB), 16 x the 12,845,056 of
# released Qwen2.5-VL checkpoints ~205M.
DECODE_PIXEL_FACTOR = 16
# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that. Its default
# (~89M) depends on the PIL version and would refuse some images our limit
# accepts with released checkpoints' max_pixels, so it is set here, explicitly,
# above any limit we allow: our header check decides, PIL's stays a backstop.
PIL_MAX_IMAGE_PIXELS = 2**28
PIL.Image.MAX_IMAGE_PIXELS = PIL_MAX_IMAGE_PIXELS

# Reasons (stable short codes, used as SkipStats keys).
MALFORMED = "malformed"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TAG_MISMATCH = "image_tag_mismatch"
UNKNOWN_ROLE = "unknown_role"
EMPTY_ASSISTANT = "empty_assistant"
NO_ASSISTANT = "no_assistant"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
# Raised by the encoder/packer (data.packing), listed here so all codes live in one place.
IMAGE_TOKENS_EXCEED_MAX_LEN = "image_tokens_exceed_max_len"
NO_LABELS_AFTER_TRUNCATION = "no_labels_after_truncation"
PATCHES_EXCEED_ROW_BUDGET = "patches_exceed_row_budget"
IMAGES_FOR_TEXT_MODEL = "images_for_text_model"
IMAGE_TOO_LARGE = "image_too_large"  # header declares more pixels than the decode limit
BAD_IMAGE = "bad_image"  # decodes, but the processor refuses it (e.g. aspect ratio over 200)
INVALID_TEXT = "invalid_text"  # text that is not valid Unicode (lone surrogates)
ENCODE_ERROR = "encode_error"  # any other exception while encoding (tokenizer, ...), type named


class MCDRecordError(ValueError):
    """One bad record: ``file``, ``index`` (position in the file), ``reason`` (short code), ``detail``."""

    def __init__(self, file: str, index: int, reason: str, detail: str):
        self.file = str(file)
        self.index = int(index)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.file}: record {self.index}: {reason}: {detail}")

    def __reduce__(self):  # picklable across grain worker processes
        return (MCDRecordError, (self.file, self.index, self.reason, self.detail))


class MCDFileError(ValueError):
    """An MCD file that cannot be read at all (not UTF-8, not JSON); the message names the file."""


class NoValidRecordError(RuntimeError):
    """A whole epoch (or far more than one) went by without one usable record."""


def check_on_error(on_error: str) -> str:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error


class LockedState:
    """A ``_lock`` that pickling leaves out and unpickling makes anew (grain copies transforms
    and their state into worker processes; a lock cannot cross)."""

    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()


class SkipStats(LockedState):
    """Counts skipped records by reason and keeps (up to ``keep``) of their indices per reason.

    Every skip is logged (absl WARNING) with the file, the record index and the problem.
    Counts are per process: with grain worker processes each worker has its own.
    """

    def __init__(self, keep: int = 1000):
        self.counts: collections.Counter[str] = collections.Counter()
        self.indices: dict[str, list[int]] = collections.defaultdict(list)
        self._keep = keep
        self._lock = threading.Lock()  # grain's read threads may map concurrently

    def add(self, err: MCDRecordError) -> None:
        with self._lock:
            self.counts[err.reason] += 1
            if len(self.indices[err.reason]) < self._keep:
                self.indices[err.reason].append(err.index)
        logging.warning("skipping MCD record: %s", err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipStats({dict(self.counts)})"


def _utf8_error(path: str, e: UnicodeDecodeError, where: str = "") -> MCDFileError:
    return MCDFileError(f"{path}: {where}not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} "
                        f"({e.reason}); MCD files must be UTF-8 encoded JSON")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of an MCD ``.json`` (a JSON list) or ``.jsonl`` (one JSON object per line) file.

    Raises:
        MCDFileError: (a ValueError) for a file that is not UTF-8 or not valid
            JSON, naming the file (and the line for JSONL), or a ``.json``
            file whose top level is not a list.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".jsonl"):
        records = []
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, f"line {lineno}: ") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MCDFileError(f"{path}: line {lineno}: not valid JSON ({e})") from None
        return records
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise MCDFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise MCDFileError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


class ImageStore(LockedState):
    """Resolves MCD image paths against a folder and/or a zip archive.

    ``root``: folder the record paths are relative to (the JSON file's folder).
    ``zip_path``: an ``mcd_images.zip`` whose members are looked up as the
    record path, the path without its first component (an archive of the
    ``mcd_images`` folder's contents) or ``mcd_images/`` + the path. The folder
    wins when both have the file. The archive is opened lazily, once per
    process (the handle is dropped on pickling, so worker processes reopen it).
    """

    def __init__(self, root: str | os.PathLike | None = None, zip_path: str | os.PathLike | None = None):
        self.root = os.fspath(root) if root is not None else None
        self.zip_path = os.fspath(zip_path) if zip_path is not None else None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._names: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @classmethod
    def for_json(cls, json_path: str | os.PathLike, images: str | os.PathLike | None = None) -> "ImageStore":
        """The store for an MCD json file: its folder, plus ``mcd_images.zip`` there if present.

        ``images`` overrides: a folder (the new root) or a ``.zip`` file.
        """
        folder = os.path.dirname(os.path.abspath(os.fspath(json_path)))
        if images is not None:
            images = os.fspath(images)
            if images.endswith(".zip"):
                return cls(folder, images)
            return cls(images, None)
        zip_path = os.path.join(folder, "mcd_images.zip")
        return cls(folder, zip_path if os.path.isfile(zip_path) else None)

    def __getstate__(self):
        d = super().__getstate__()
        d.update(_zip=None, _zip_pid=None, _names=frozenset())
        return d

    def _archive(self) -> zipfile.ZipFile:
        with self._lock:
            if self._zip is None or self._zip_pid != os.getpid():
                self._zip = zipfile.ZipFile(self.zip_path)
                self._zip_pid = os.getpid()
                self._names = frozenset(self._zip.namelist())
            return self._zip

    def _member(self, rel: str) -> str | None:
        self._archive()
        rel = rel.replace(os.sep, "/")
        while rel.startswith("./"):
            rel = rel[2:]
        candidates = [rel]
        if "/" in rel:
            candidates.append(rel.split("/", 1)[1])
        candidates.append("mcd_images/" + rel)
        for c in candidates:
            if c in self._names:
                return c
        return None

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes. Raises FileNotFoundError naming where it looked."""
        tried = []
        if self.root is not None:
            path = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    return f.read()
            tried.append(path)
        if self.zip_path is not None:
            member = self._member(rel)
            if member is not None:
                return self._archive().read(member)
            tried.append(f"{self.zip_path}:{rel}")
        raise FileNotFoundError(f"image {rel!r} not found (looked at {', '.join(tried) or 'nothing'})")

    def exists(self, rel: str) -> bool:
        try:
            self.read_bytes(rel)
            return True
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def check_messages(record: Any, index: int, file: str) -> list[str]:
    """Validates a record's structure and text; returns its image paths.

    Raises:
        MCDRecordError: malformed structure, unknown role, no assistant turn,
            an empty assistant turn, ``<image>`` tags != images, or a Qwen
            special-token string inside the text.
    """
    def err(reason: str, detail: str) -> MCDRecordError:
        return MCDRecordError(file, index, reason, detail)

    if not isinstance(record, Mapping):
        raise err(MALFORMED, f"record is a {type(record).__name__}, not an object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise err(MALFORMED, "'messages' must be a non-empty list")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise err(MALFORMED, "'images' must be a list of path strings")
    n_tags = 0
    has_assistant = False
    for m, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise err(MALFORMED, f"message {m} must be an object with a 'role' and a string 'content'")
        role, content = msg["role"], msg["content"]
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON \ud800-style escapes decode to lone surrogates
            raise err(INVALID_TEXT, f"message {m} ({role}) is not valid Unicode: {e.reason} at character "
                                    f"{e.start} ({content[e.start]!r})") from None
        if role not in ALLOWED_ROLES:
            raise err(UNKNOWN_ROLE, f"message {m} has role {role!r} (allowed: {', '.join(ALLOWED_ROLES)})")
        for tok in _FORBIDDEN_IN_TEXT:
            if tok in content:
                raise err(SPECIAL_TOKEN_IN_TEXT, f"message {m} ({role}) contains the special token {tok}")
        if role == "assistant":
            has_assistant = True
            if not content.strip():
                raise err(EMPTY_ASSISTANT, f"message {m} is an empty assistant turn")
        else:
            n_tags += content.count(IMAGE_TAG)
    if not has_assistant:
        raise err(NO_ASSISTANT, "no assistant turn (nothing to train on)")
    if n_tags > len(images):
        raise err(IMAGE_TAG_MISMATCH, f"more {IMAGE_TAG} tags ({n_tags}) than images ({len(images)})")
    if n_tags < len(images):
        raise err(IMAGE_TAG_MISMATCH, f"fewer {IMAGE_TAG} tags ({n_tags}) than images ({len(images)})")
    return list(images)


def decode_limit(processor_max_pixels: int, max_image_pixels: int | None = None) -> int:
    """The most pixels an image may declare before it is decoded (``max_image_pixels`` overrides)."""
    return int(max_image_pixels) if max_image_pixels else DECODE_PIXEL_FACTOR * int(processor_max_pixels)


def decode_image(data: bytes, rel: str, index: int, file: str, max_pixels: int | None = None) -> PIL.Image.Image:
    """Fully decodes image bytes (so truncated files fail here, not later).

    The size is read from the header first: an image declaring more than
    ``max_pixels`` (None: no limit but PIL's) is refused before decoding.
    """
    try:
        img = PIL.Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, DecompressionBombError...)
        raise MCDRecordError(file, index, CORRUPT_IMAGE, f"image {rel!r} cannot be opened ({e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise MCDRecordError(file, index, CORRUPT_IMAGE, f"image {rel!r} is empty ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise MCDRecordError(file, index, IMAGE_TOO_LARGE,
                             f"image {rel!r} is {w}x{h} = {w * h} pixels, more than the decode limit of {max_pixels} "
                             f"(not decoded; raise --config.data.max_image_pixels to allow it)")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise MCDRecordError(file, index, CORRUPT_IMAGE, f"image {rel!r} cannot be decoded ({e})") from None
    return img


def load_images(
    paths: Sequence[str], image_bytes: Sequence[bytes | None] | None, store: ImageStore | None, index: int, file: str,
    max_pixels: int | None = None,
) -> list[PIL.Image.Image]:
    """Decoded images of one record, from given bytes (``None`` = missing) or through ``store``."""
    out = []
    for k, rel in enumerate(paths):
        data = image_bytes[k] if image_bytes is not None and k < len(image_bytes) else None
        if data is None and image_bytes is None and store is not None:
            try:
                data = store.read_bytes(rel)
            except FileNotFoundError as e:
                raise MCDRecordError(file, index, MISSING_IMAGE, str(e)) from None
        if data is None:
            raise MCDRecordError(file, index, MISSING_IMAGE, f"image file {rel!r} is missing")
        out.append(decode_image(data, rel, index, file, max_pixels))
    return out


def validate_records(
    path: str | os.PathLike,
    store: ImageStore | None = None,
    on_error: str = "raise",
    check_images: bool = True,
) -> tuple[list[int], SkipStats]:
    """Scans a whole MCD file; returns (indices of valid records, skip stats).

    ``check_images`` also opens and decodes every image (slow for 598k records,
    but it is the only way to find corrupt PNGs before training).
    """
    check_on_error(on_error)
    file = os.fspath(path)
    store = store if store is not None else ImageStore.for_json(file)
    stats = SkipStats()
    valid = []
    for i, rec in enumerate(read_records(file)):
        try:
            paths = check_messages(rec, i, file)
            if check_images:
                load_images(paths, None, store, i, file)
        except MCDRecordError as e:
            if on_error == "raise":
                raise
            stats.add(e)
            continue
        valid.append(i)
    return valid, stats


def iter_valid(
    path: str | os.PathLike, store: ImageStore | None = None, on_error: str = "raise"
) -> Iterator[tuple[int, dict[str, Any], list[PIL.Image.Image]]]:
    """(index, record, decoded images) for every valid record of a file."""
    check_on_error(on_error)
    file = os.fspath(path)
    store = store if store is not None else ImageStore.for_json(file)
    stats = SkipStats()
    for i, rec in enumerate(read_records(file)):
        try:
            images = load_images(check_messages(rec, i, file), None, store, i, file)
        except MCDRecordError as e:
            if on_error == "raise":
                raise
            stats.add(e)
            continue
        yield i, rec, images
