"""Shared fixtures: tiny random HF checkpoints, written once per session; markers for slow, parity and sandbox
tests (``-m "not slow"`` for a quick pass). The helpers live in ``viscodex_jax.testing``."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from viscodex_jax.testing.models import make_hf_model  # noqa: E402

MARKERS = {
    "slow": "runs for minutes: subprocess pipelines, kill/resume, the demo, TPU compiles",
    "parity": "compares against a reference implementation (transformers, an official evaluator)",
    "sandbox": "runs untrusted code in the sandbox (needs bwrap/seccomp/cgroups as on CI)",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


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
