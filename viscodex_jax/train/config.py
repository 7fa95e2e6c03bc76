"""The training config schema with defaults; ``configs/*.py`` start from it and override.

``validate_config`` checks every field before any work starts (no workdir,
no checkpoint read): a bad value is a ``ConfigError`` naming the
``--config.<field>`` flag and what was expected.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections

from viscodex_jax.model.config import ConfigError
from viscodex_jax.sharding import DEFAULT_RULES

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/train"
    c.distributed = False  # jax.distributed.initialize() (multi-host: TPU pods, SLURM)
    c.export_hf = ""  # write the final params as a HF checkpoint here
    c.export_dtype = "bfloat16"
    c.overwrite = False  # let export_hf replace an existing directory

    c.model = ml_collections.ConfigDict()
    c.model.init_checkpoint = ""  # HF dir or our orbax dir (the merged model)
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # compute dtype
    c.model.attention_impl = "xla"  # xla (reference) | blockwise | splash (TPU) | cudnn (GPU) | splash_interpret
    c.model.remat_policy = "none"  # none | full | proj | proj_mlp | qkv | dots | dots_no_batch (model.text)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # MCD json/jsonl, or a prepared TFDS dir
    c.data.max_len = 4096
    c.data.batch_size = 8  # global rows per step (per micro-step with accumulation)
    c.data.patches_per_row = 4096
    c.data.seed = 0
    c.data.num_epochs = 0  # 0: repeat forever (the step count decides)
    c.data.on_error = "skip"  # or "raise"
    c.data.worker_count = 0
    # Images whose header declares more pixels than this are skipped before
    # decoding; 0: 16 x the processor's max_pixels (see data.mcd.decode_limit).
    c.data.max_image_pixels = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.accum_steps = 1
    c.train.trainable = "llm"  # llm (paper: vision tower + merger frozen) | llm+merger | all
    c.train.skip_nonfinite = False
    # With skip_nonfinite: stop (NonFiniteError) once more than this fraction of
    # the steps run so far were skipped; one skipped step is always tolerated.
    # A run that skips more than 1 step in 10 is diverging, not hitting a rare
    # bad batch, and its weights should not be exported.
    c.train.max_skipped_fraction = 0.1
    c.train.vocab_chunk = 8192
    c.train.peak_tflops = 0.0  # per device, for MFU; 0: known devices only

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.total_steps = 1000
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    # ((regex, factor), ...): per-group lr (first match wins, others 1), e.g. (("^visual/", 10.0),)
    c.optim.lr_scale = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.mesh.rules = [list(r) for r in DEFAULT_RULES]

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c


def _field(c, name: str) -> Any:
    node = c
    for part in name.split("."):
        node = node[part]
    return node


def _err(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"--config.{name}={value!r}: expected {expected}")


def _int(c, name: str, lo: int) -> None:
    v = _field(c, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _err(name, v, f"an integer >= {lo}")


def _float(c, name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    v = _field(c, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise _err(name, v, f"a finite number {bound}")


def _choice(c, name: str, choices: tuple[str, ...]) -> None:
    v = _field(c, name)
    if v not in choices:
        raise _err(name, v, f"one of {', '.join(repr(x) for x in choices)}")


def validate_config(c) -> None:
    """Raises ConfigError naming the first bad field of a training config.

    Also refuses an existing ``export_hf`` directory unless ``overwrite`` is
    set, so a finished run never replaces a directory it was not told it may.
    """
    from viscodex_jax.model.attention import IMPLS
    from viscodex_jax.model.text import remat_policy_names
    from viscodex_jax.train.step import TRAINABLE_PRESETS

    for name in ("model.init_checkpoint", "data.train", "workdir"):
        if not isinstance(_field(c, name), str) or not _field(c, name):
            raise _err(name, _field(c, name), "a non-empty path")
    if not os.path.isdir(c.model.init_checkpoint):
        raise _err("model.init_checkpoint", c.model.init_checkpoint, "an existing checkpoint directory")
    if not os.path.exists(c.data.train):
        raise _err("data.train", c.data.train, "an existing MCD .json/.jsonl file or prepared TFDS dir")
    _choice(c, "model.param_dtype", FLOAT_DTYPES)
    _choice(c, "model.dtype", FLOAT_DTYPES)
    _choice(c, "export_dtype", FLOAT_DTYPES + ("",))
    _choice(c, "model.remat_policy", remat_policy_names())
    _choice(c, "model.attention_impl", IMPLS)
    if isinstance(c.train.trainable, str):
        _choice(c, "train.trainable", tuple(TRAINABLE_PRESETS))
    for name in ("data.max_len", "data.batch_size", "train.steps", "train.accum_steps", "train.vocab_chunk",
                 "optim.total_steps", "checkpoint.save_every", "checkpoint.keep"):
        _int(c, name, 1)
    for name in ("data.patches_per_row", "data.seed", "data.num_epochs", "data.worker_count",
                 "data.max_image_pixels", "optim.warmup_steps"):
        _int(c, name, 0)
    _choice(c, "data.on_error", ("skip", "raise"))
    _float(c, "optim.lr", 0.0)
    _float(c, "optim.end_lr_ratio", 0.0, 1.0)
    _float(c, "optim.b1", 0.0, 1.0)
    _float(c, "optim.b2", 0.0, 1.0)
    _float(c, "optim.eps", 0.0, lo_open=True)
    _float(c, "optim.weight_decay", 0.0)
    _float(c, "optim.clip_norm", 0.0, lo_open=True)
    _float(c, "train.max_skipped_fraction", 0.0, 1.0)
    for i, entry in enumerate(c.optim.lr_scale):
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
        ok = ok and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
        ok = ok and math.isfinite(entry[1]) and entry[1] > 0
        try:
            ok = ok and re.compile(entry[0]) is not None
        except re.error:
            ok = False
        if not ok:
            raise _err(f"optim.lr_scale[{i}]", entry, "a (regex, factor > 0) pair")
    _float(c, "train.peak_tflops", 0.0)
    if c.export_hf:
        if os.path.abspath(c.export_hf) == os.path.abspath(c.model.init_checkpoint):
            raise _err("export_hf", c.export_hf, "a directory other than --config.model.init_checkpoint")
        if os.path.exists(c.export_hf) and not c.overwrite:
            raise ConfigError(f"--config.export_hf={c.export_hf!r}: already exists; the export would replace it. "
                              "Choose another directory or pass --config.overwrite=true")
