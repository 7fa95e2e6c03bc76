"""Shared fixtures: tiny random HF checkpoints, written once per session; markers for slow, parity and sandbox
tests (``-m "not slow"`` for a quick pass). The helpers live in ``viscodex_jax.testing``."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the run: the train/eval/demo subprocesses the tests start inherit
# this environment and compile the same tiny programs again and again (a killed run and its resume, the demo's
# stages). Entries are keyed by the program, XLA flags and devices, so a hit is the executable a fresh compile
# would give. A max size turns on jax's file lock: xdist workers and subprocesses write it at the same time.
# Made by the first process (the xdist controller); workers inherit it; the maker removes it at the end.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="viscodex-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import pytest  # noqa: E402

from viscodex_jax.testing.models import make_hf_model  # noqa: E402

MARKERS = {
    "slow": "runs for minutes: subprocess pipelines, kill/resume, the demo, TPU compiles",
    "parity": "compares against a reference implementation (transformers, an official evaluator)",
    "sandbox": "runs untrusted code in the sandbox (needs bwrap/seccomp/cgroups as on CI)",
}


# Modules that run for minutes, longest first (by their serial time on 2 cores in a fresh clone). Under
# ``-n 2 --dist loadscope`` each module goes whole to one worker (its module fixtures are built once) in
# collection order; starting the long ones first lets the short ones fill in at the end, so both workers
# finish together. A module missing here only runs later; a renamed one is ignored.
LONGEST_FIRST = (
    "test_tiny_and_demo.py",
    "test_training.py",
    "test_design2code_official.py",
    "test_train_step.py",
    "test_chartmimic_official.py",
    "test_compile_check.py",
    "test_sampling.py",
    "test_guards_train_data.py",
)


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    if getattr(config.option, "dist", "no") in ("loadscope", "loadgroup"):
        # xdist's default re-sorts the modules by their number of tests, which would start the demo (a few
        # tests, minutes each) last; keep LONGEST_FIRST's order instead.
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    if _JAX_CACHE is not None:
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-module order is kept


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> directory with a saved tiny HF checkpoint of ``testing.models`` (made on first use)."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            d = str(tmp_path_factory.mktemp(name))
            make_hf_model(name).save_pretrained(d)
            made[name] = d
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """seed -> {"base", "vlm", "coder"}: ``testing.tiny``'s checkpoints (real tokenizer), made once per seed.

    Shared by every test that asks for the same seed: treat them as read-only (copy before editing).
    """
    from viscodex_jax.testing.tiny import make_tiny_checkpoints

    made: dict[int, dict[str, str]] = {}

    def get(seed: int) -> dict[str, str]:
        if seed not in made:
            made[seed] = make_tiny_checkpoints(str(tmp_path_factory.mktemp(f"tiny_seed{seed}") / "t"), seed=seed)
        return made[seed]

    return get
