"""Grain input pipeline for MCD: source -> host shard -> shuffle -> epochs -> encode -> pack -> prefetch.

Sources are random-access (``len`` + ``__getitem__``) and yield one canonical
element per record::

    {"index": int, "file": str, "record": str (the record's JSON), "images": [bytes | None, ...]}

``MCDJsonSource`` reads an MCD ``.json``/``.jsonl`` directly (quick starts);
``tfds_mcd.TfdsMCDSource`` reads the ArrayRecord shards prepared by the TFDS
builder (random access, no TensorFlow at read time, scales to the 598k records).

``make_dataset`` builds the grain pipeline::

    MapDataset.source(src)[host::hosts].shuffle(seed).repeat(epochs).map(encode)
      .to_iter_dataset(ReadOptions) -> PackIterDataset -> [mp_prefetch] -> [thread prefetch]

and every iterator of it supports ``get_state()`` / ``set_state()``: a
restored iterator yields exactly the batches the original would have yielded
next (the packer's state is the parent's state before its carried-over record).
Batches are the numpy dicts described in ``data.packing``. Bad records are
skipped and counted (``on_error="skip"``) or raise ``MCDRecordError`` on the
host (``"raise"``), never inside jitted code. Any exception while encoding a
record (image checks and processing, the tokenizer, limits) counts: it becomes
an ``MCDRecordError`` naming the file and record. A pass over a whole epoch
without one usable record raises ``NoValidRecordError`` instead of looping.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from typing import Any

import grain

from viscodex_jax.data import mcd
from viscodex_jax.data.image_processor import ImageProcessorConfig
from viscodex_jax.data.encode import EncodedRecord, encode_record
from viscodex_jax.data.packing import Packer
from viscodex_jax.model.config import ConfigError, ModelConfig

__all__ = [
    "MCDEncode",
    "MCDJsonSource",
    "PackIterDataset",
    "PipelineConfig",
    "host_shard",
    "make_dataset",
    "make_source",
]


class MCDJsonSource:
    """A grain random-access source over an MCD ``.json``/``.jsonl`` file.

    Records are kept as JSON strings (compact, cheap to pickle to workers);
    image bytes are read on access through an :class:`mcd.ImageStore` (folder
    or ``mcd_images.zip`` next to the json, or ``images=``), ``None`` when the
    file is missing (the encoder turns that into a ``missing_image`` error).
    """

    def __init__(self, path: str | os.PathLike, images: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        self.store = mcd.ImageStore.for_json(self.path, images)
        self._records = [json.dumps(r, ensure_ascii=False) for r in mcd.read_records(self.path)]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        raw = self._records[index]
        rec = json.loads(raw)
        paths = rec.get("images") if isinstance(rec, dict) else None
        images: list[bytes | None] = []
        if isinstance(paths, list):
            for p in paths:
                try:
                    images.append(self.store.read_bytes(p) if isinstance(p, str) else None)
                except FileNotFoundError:
                    images.append(None)
        return {"index": index, "file": self.path, "record": raw, "images": images}

    def __repr__(self) -> str:
        return f"MCDJsonSource({self.path!r}, {len(self)} records)"


def make_source(path: str | os.PathLike, split: str = "train", images: str | os.PathLike | None = None):
    """A source for a ``.json``/``.jsonl`` file, or for a TFDS data dir prepared by ``tfds_mcd``."""
    path = os.fspath(path)
    if path.endswith((".json", ".jsonl")):
        return MCDJsonSource(path, images)
    from viscodex_jax.data.tfds_mcd import TfdsMCDSource

    return TfdsMCDSource(path, split=split)


class MCDEncode(mcd.LockedState, grain.transforms.MapWithIndex):
    """Grain map: canonical source element -> ``EncodedRecord`` (or ``None`` = skipped, counted).

    A record is usable when it encodes and fits a packed row on its own
    (``patches_per_row``), so the packer never drops what this passed.
    ``epoch_len`` (records per epoch this process reads) turns an epoch with
    no usable record into ``NoValidRecordError``: exactly, from the element
    index, when this process sees whole epochs; and, with grain worker
    processes (each sees part of an epoch), after ``2 * epoch_len + 64``
    failures in a row, which no sequence holding a usable record per epoch
    reaches (the 64 absorbs reordering between read threads).
    """

    def __init__(self, tokenizer, model_cfg: ModelConfig, max_len: int,
                 image_cfg: ImageProcessorConfig | None = None, on_error: str = "skip",
                 stats: mcd.SkipStats | None = None, patches_per_row: int | None = None,
                 max_image_pixels: int | None = None, epoch_len: int | None = None):
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.max_len = max_len
        self.image_cfg = image_cfg or ImageProcessorConfig()
        self.on_error = mcd.check_on_error(on_error)
        self.stats = stats if stats is not None else mcd.SkipStats()
        self.patches_per_row = patches_per_row if model_cfg.vision is not None else None
        self.max_image_pixels = mcd.decode_limit(self.image_cfg.max_pixels, max_image_pixels)
        self.epoch_len = epoch_len
        self._lock = threading.Lock()
        self._per_epoch: dict[int, list[int]] = {}  # epoch -> [records seen, usable]
        self._fails_in_a_row = 0

    def map(self, element: dict[str, Any]) -> EncodedRecord | None:
        return self.map_with_index(None, element)

    def map_with_index(self, position: int | None, element: dict[str, Any]) -> EncodedRecord | None:
        file, index = str(element.get("file", "<source>")), int(element["index"])
        try:
            rec = self._encode(element, file, index)
        except mcd.MCDRecordError as e:
            err = e
        except ConfigError:
            raise  # the model/tokenizer setup is wrong, not this record: skipping every record would hide it
        except Exception as e:  # noqa: BLE001 - any failure on one record is that record's, named and counted
            err = mcd.MCDRecordError(file, index, mcd.ENCODE_ERROR, f"{type(e).__name__}: {e}")
            if self.on_error == "raise":
                raise err from e
        else:
            self._account(position, True, file)
            return rec
        if self.on_error == "raise":
            raise err
        self.stats.add(err)
        self._account(position, False, file)
        return None

    def _encode(self, element: dict[str, Any], file: str, index: int) -> EncodedRecord:
        raw = element["record"]
        try:
            record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise mcd.MCDRecordError(file, index, mcd.MALFORMED, f"record is not valid JSON ({e})") from None
        paths = mcd.check_messages(record, index, file)
        images = mcd.load_images(paths, list(element.get("images") or []), None, index, file, self.max_image_pixels)
        rec = encode_record(record, images, self.tokenizer, self.image_cfg, self.model_cfg,
                            self.max_len, index=index, file=file)
        if self.patches_per_row is not None and rec.num_patches > self.patches_per_row:
            raise mcd.MCDRecordError(file, index, mcd.PATCHES_EXCEED_ROW_BUDGET,
                                     f"{rec.num_patches} image patches > patches_per_row={self.patches_per_row}")
        return rec

    def _account(self, position: int | None, ok: bool, file: str) -> None:
        if not self.epoch_len:
            return
        with self._lock:
            self._fails_in_a_row = 0 if ok else self._fails_in_a_row + 1
            empty_epoch = False
            if position is not None:
                epoch = position // self.epoch_len
                if epoch not in self._per_epoch:
                    # epochs a worker process only sees part of never complete: keep a few, not all
                    for old in [e for e in self._per_epoch if e < epoch - 2]:
                        del self._per_epoch[old]
                seen = self._per_epoch.setdefault(epoch, [0, 0])
                seen[0] += 1
                seen[1] += ok
                empty_epoch = seen[0] == self.epoch_len and seen[1] == 0
                if seen[0] == self.epoch_len:
                    del self._per_epoch[epoch]
            in_a_row = self._fails_in_a_row
        if empty_epoch or in_a_row >= 2 * self.epoch_len + 64:
            what = ("all records of one epoch" if empty_epoch
                    else f"{in_a_row} records in a row (an epoch has {self.epoch_len})")
            raise mcd.NoValidRecordError(
                f"{file}: no usable record: {what} were skipped, by reason {self.stats.as_dict()} "
                f"(see the warnings above for each record; first skipped indices "
                f"{ {k: v[:5] for k, v in self.stats.indices.items()} })")


class PackIterDataset(grain.IterDataset):
    """Packs ``EncodedRecord``s into static-shape batches with a :class:`Packer` (checkpointable)."""

    def __init__(self, parent: grain.IterDataset, packer: Packer, drop_remainder: bool = False):
        super().__init__(parent)
        self._packer = packer
        self._drop_remainder = drop_remainder

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._packer, self._drop_remainder)

    def __str__(self) -> str:
        p = self._packer
        return f"PackIterDataset(batch_size={p.batch_size}, max_len={p.max_len}, patches_per_row={p.patches_per_row})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, packer: Packer, drop_remainder: bool):
        super().__init__(parent)
        self._packer = packer
        self._drop_remainder = drop_remainder
        # The record read but not yet placed (it did not fit the last row), and
        # the parent's state just before it was read: restoring that state
        # re-reads it, which makes the packer's own state stateless.
        self._pending: EncodedRecord | None = None
        self._pending_state: dict[str, Any] | None = None

    def __next__(self) -> dict[str, Any]:
        packer = self._packer
        rows: list[list[EncodedRecord]] = []
        cur: list[EncodedRecord] = []
        while True:
            if self._pending is None:
                state = copy.deepcopy(self._parent.get_state())
                try:
                    rec = next(self._parent)
                except StopIteration:
                    break
                if not packer.fits_alone(rec):
                    continue
                self._pending, self._pending_state = rec, state
            rec = self._pending
            if cur and not packer.fits(cur, rec):
                rows.append(cur)
                cur = []
                if len(rows) == packer.batch_size:
                    return packer.make_batch(rows)
            cur.append(rec)
            self._pending = self._pending_state = None
        if cur:
            rows.append(cur)
        if not rows or (self._drop_remainder and len(rows) < packer.batch_size):
            raise StopIteration
        return packer.make_batch(rows)

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"parent": copy.deepcopy(self._pending_state)}
        return {"parent": copy.deepcopy(self._parent.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings.

    ``patches_per_row``: image-patch budget of one packed row (a multiple of
    spatial_merge_size**2; ignored for text-only models). ``num_epochs=None``
    repeats forever (each epoch reshuffled). ``shard_index``/``shard_count``
    default to ``jax.process_index()``/``jax.process_count()``.
    ``worker_count > 0`` runs encode + pack in grain worker processes
    (``mp_prefetch``); ``read_threads`` parallelise encoding within a process.
    ``max_image_pixels``: images declaring more pixels are skipped before
    decoding (None: ``mcd.decode_limit`` of the processor's max_pixels).
    """

    batch_size: int
    max_len: int
    patches_per_row: int | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    on_error: str = "skip"
    drop_remainder: bool = False
    shard_index: int | None = None
    shard_count: int | None = None
    read_threads: int = 4
    read_buffer_size: int = 32
    worker_count: int = 0
    worker_buffer_size: int = 2
    prefetch: int = 2
    max_image_pixels: int | None = None


def host_shard(ds: grain.MapDataset, shard_index: int | None = None, shard_count: int | None = None) -> grain.MapDataset:
    """This host's part of ``ds``: elements ``shard_index::shard_count`` (disjoint, covering)."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return ds[shard_index::shard_count] if shard_count > 1 else ds


def make_dataset(
    source,
    tokenizer,
    model_cfg: ModelConfig,
    config: PipelineConfig,
    image_cfg: ImageProcessorConfig | None = None,
    stats: mcd.SkipStats | None = None,
) -> grain.IterDataset:
    """The packed, batched MCD pipeline (iterate it, or ``iter()`` it for a checkpointable iterator).

    ``source``: anything random-access yielding canonical elements (see module
    doc), or a path for :func:`make_source`. ``stats`` collects skipped-record
    counts of this process (worker processes count their own and log them).
    """
    if isinstance(source, (str, os.PathLike)):
        source = make_source(source)
    stats = stats if stats is not None else mcd.SkipStats()
    ds = grain.MapDataset.source(source)
    ds = host_shard(ds, config.shard_index, config.shard_count)
    epoch_len = len(ds)
    if epoch_len == 0:
        raise mcd.NoValidRecordError(f"{source!r}: no records to read (this host's shard "
                                     f"{config.shard_index}/{config.shard_count} is empty)")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds.map_with_index(MCDEncode(tokenizer, model_cfg, config.max_len, image_cfg, config.on_error, stats,
                                     patches_per_row=config.patches_per_row,
                                     max_image_pixels=config.max_image_pixels, epoch_len=epoch_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packer = Packer(config.batch_size, config.max_len, pad_id, model_cfg.vision, config.patches_per_row, stats,
                    tower=model_cfg.family.tower)
    it = PackIterDataset(it, packer, config.drop_remainder)
    if config.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags (e.g. profiling switches);
            # outside an absl app nobody parsed them, so take their defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    if config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return it
