"""Logging set-up for the entry points: our progress at INFO, chatty libraries at WARNING."""

from __future__ import annotations

import logging

_NOISY = ("orbax", "jax/_src", "etils", "absl/", "tensorstore")


class _DropNoisyInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _NOISY)


def quiet_third_party() -> None:
    """orbax logs every save/restore step at INFO through absl; keep only its warnings."""
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_DropNoisyInfo())
    logging.getLogger("absl").addFilter(_DropNoisyInfo())
