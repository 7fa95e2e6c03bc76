"""TFDS builder for MCD: the JSON + images prepared into ArrayRecord shards, read back by random access.

Preparing (no TensorFlow needed, tensorflow-datasets alone builds ``array_record``)::

    builder = prepare_mcd_tfds(manual_dir="/data/mcd", data_dir="/data/tfds")
    source = TfdsMCDSource("/data/tfds", split="train")   # grain source, see data.pipeline

The manual dir holds the MCD json(s) and the images (``mcd_images/`` folder or
``mcd_images.zip``). File names map to splits: ``mcd_598k.json[l]`` -> ``train``,
``mcd_<split>.json[l]`` -> ``<split>`` (e.g. the sample's ``mcd_train.json`` and
``mcd_heldout.json``). Each example stores

    record  Text     the record's JSON, unchanged (messages, images paths, category)
    images  Sequence of bytes, the encoded image files in record order
    index   int64    the record's index in its json file (for error messages)

Records are validated while preparing (roles, ``<image>`` tags, missing and
corrupt images...): ``config="strict"`` raises ``MCDRecordError``, the default
config skips them, logs each index and stores the counts per reason and split
in the dataset's metadata (``builder.info.metadata["skipped"]``). Example order
is the file's order (shuffling is the pipeline's job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from viscodex_jax.data import mcd

__all__ = ["MCDBuilderConfig", "TfdsMCDSource", "ViscodexMcd", "prepare_mcd_tfds", "split_files"]

NAME = "viscodex_mcd"
_SPLIT_RE = re.compile(r"^mcd_([A-Za-z0-9_]+)\.jsonl?$")


def split_files(manual_dir: str) -> dict[str, str]:
    """{split: json path} found in ``manual_dir`` (see module doc for the naming rule)."""
    out: dict[str, str] = {}
    for fname in sorted(os.listdir(manual_dir)):
        m = _SPLIT_RE.match(fname)
        if not m:
            continue
        split = "train" if m.group(1) == "598k" else m.group(1)
        if split in out:
            raise ValueError(f"{manual_dir}: two files for split {split!r}: {out[split]} and {fname}")
        out[split] = os.path.join(manual_dir, fname)
    if not out:
        raise FileNotFoundError(f"{manual_dir}: no mcd_598k.json or mcd_<split>.json[l] files")
    return out


@dataclasses.dataclass
class MCDBuilderConfig(tfds.core.BuilderConfig):
    on_error: str = "skip"


class ViscodexMcd(tfds.core.GeneratorBasedBuilder):
    """MCD records (JSON) + image bytes as ArrayRecord."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Record JSON + image bytes."}
    BUILDER_CONFIGS = [
        MCDBuilderConfig(name="default", description="invalid records are skipped and counted", on_error="skip"),
        MCDBuilderConfig(name="strict", description="an invalid record fails the build", on_error="raise"),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put mcd_598k.json (or mcd_<split>.json / .jsonl files) and the images "
        "(mcd_images/ or mcd_images.zip) in the manual dir."
    )

    # TFDS 4.9.10 resolves a builder's code path through
    # ``importlib_resources`` (only a dependency of it on Python < 3.9), so a
    # builder living in an installed package fails on 3.11 without that
    # backport. The path is only used to look for a checksums file next to the
    # code; point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs reads metadata files
        # from a dataset *package* folder, which a module-level builder lacks.
        return tfds.core.DatasetInfo(
            builder=self,
            description="MCD (VisCodex multimodal coding dataset): record JSON + image bytes.",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                "index": np.int64,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            homepage="https://huggingface.co/datasets/lingjie23/MultimodalCodingDataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = split_files(os.fspath(dl_manager.manual_dir))
        self.info.metadata.setdefault("skipped", {})
        return {split: self._generate_examples(split, path) for split, path in files.items()}

    def _generate_examples(self, split: str, path: str):
        on_error = mcd.check_on_error(self.builder_config.on_error)
        store = mcd.ImageStore.for_json(path)
        stats = mcd.SkipStats()
        for i, rec in enumerate(mcd.read_records(path)):
            try:
                paths = mcd.check_messages(rec, i, path)
                blobs = []
                for p in paths:
                    try:
                        data = store.read_bytes(p)
                    except FileNotFoundError as e:
                        raise mcd.MCDRecordError(path, i, mcd.MISSING_IMAGE, str(e)) from None
                    mcd.decode_image(data, p, i, path)
                    blobs.append(data)
            except mcd.MCDRecordError as e:
                if on_error == "raise":
                    raise
                stats.add(e)
                continue
            yield i, {"record": json.dumps(rec, ensure_ascii=False), "images": blobs, "index": i}
        self.info.metadata["skipped"][split] = stats.as_dict()
        store.close()


def prepare_mcd_tfds(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, config: str = "default",
                     overwrite: bool = False) -> ViscodexMcd:
    """Builds the ArrayRecord dataset under ``data_dir`` from the MCD files in ``manual_dir``."""
    builder = ViscodexMcd(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite
            else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), download_mode=mode)
    )
    return builder


class TfdsMCDSource:
    """Grain random-access source over the prepared dataset, via ``tfds.data_source``.

    Yields the pipeline's canonical elements (``record`` as str, ``images`` as
    a list of bytes). The TFDS data source is opened lazily in each process.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", config: str = "default"):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.config = config
        self._ds = None
        self._len = len(self._source())

    def _source(self):
        if self._ds is None:
            self._ds = tfds.data_source(f"{NAME}/{self.config}", split=self.split, data_dir=self.data_dir,
                                        download=False)
        return self._ds

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_ds"] = None
        return d

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        el = self._source()[int(index)]
        raw = el["record"]
        return {
            "index": int(el["index"]),
            "file": f"{NAME}/{self.config}:{self.split}",
            "record": raw.decode("utf-8") if isinstance(raw, bytes) else str(raw),
            "images": [bytes(b) for b in el["images"]],
        }

    def __repr__(self) -> str:
        return f"TfdsMCDSource({self.data_dir!r}, split={self.split!r}, {len(self)} records)"
