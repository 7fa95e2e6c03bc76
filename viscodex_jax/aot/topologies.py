"""TPU slices by name -> the slice's devices (from libtpu, no chip needed) and the HBM of one chip.

Two spellings are accepted:

* a topology: ``v5p:2x2x1``, ``v5e:2x4``, ``v6e:4x4`` (chips along each ICI axis), passed to
  ``jax.experimental.topologies.get_topology_desc`` as is;
* a Cloud TPU slice name: ``v5p-8`` (v5p counts TensorCores, two per chip: 4 chips),
  ``v5e-8`` / ``v6e-8`` (one core per chip: 8 chips), mapped to the default topology
  Cloud TPU gives that slice.

libtpu takes a machine-wide lock file when it loads, so two processes could not
compile at once (a test next to a benchmark would fail with "ABORTED: ... libtpu
multi-process lockfile"). Nothing here runs on a chip, so the lock is waived
(``ALLOW_MULTIPLE_LIBTPU_LOAD``) unless the caller set it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

GIB = 1024**3

# HBM per chip (Cloud TPU documentation; v5p's 95.74 GiB is what its runtime reports).
HBM_BYTES = {"v5e": 16 * GIB, "v6e": 32 * GIB, "v5p": int(95.74 * GIB)}
# TensorCores per chip: Cloud TPU slice names count cores for v5p, chips for v5e/v6e.
CORES_PER_CHIP = {"v5e": 1, "v6e": 1, "v5p": 2}
# Default topologies of the slices Cloud TPU sells (chips -> shape).
SLICE_SHAPES = {
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16"},
    "v5e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
_TOPOLOGY = re.compile(r"^(v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")
_SLICE = re.compile(r"^(v5p|v5e|v6e)-(\d+)$")


class TopologyError(ValueError):
    """A slice name we cannot map to a TPU topology."""


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given
    generation: str  # v5p | v5e | v6e
    topology: str  # libtpu's name, e.g. "v5p:2x2x1"
    chips: int
    hbm_bytes: int

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GIB


def parse_slice(name: str) -> Slice:
    """``v5p:2x2x1`` or ``v5p-8`` -> Slice (no libtpu needed)."""
    name = name.strip()
    m = _TOPOLOGY.match(name)
    if m:
        gen, shape = m.groups()
        chips = 1
        for s in shape.split("x"):
            chips *= int(s)
        if (gen == "v5p") != (shape.count("x") == 2):
            raise TopologyError(f"--topology={name}: {gen} slices have {'3' if gen == 'v5p' else '2'} axes "
                                f"(e.g. {gen}:{next(iter(SLICE_SHAPES[gen].values()))})")
        return Slice(name, gen, name, chips, HBM_BYTES[gen])
    m = _SLICE.match(name)
    if m:
        gen, n = m.group(1), int(m.group(2))
        cores = CORES_PER_CHIP[gen]
        chips = n // cores
        if n % cores or chips not in SLICE_SHAPES[gen]:
            known = ", ".join(f"{gen}-{c * cores}" for c in SLICE_SHAPES[gen])
            raise TopologyError(f"--topology={name}: unknown slice size; known: {known} "
                                f"(or give the shape, e.g. {gen}:{SLICE_SHAPES[gen][max(SLICE_SHAPES[gen])]})")
        return Slice(name, gen, f"{gen}:{SLICE_SHAPES[gen][chips]}", chips, HBM_BYTES[gen])
    raise TopologyError(f"--topology={name!r}: expected <gen>:<shape> (v5p:2x2x1, v5e:2x4, v6e:4x4) "
                        f"or a slice name (v5p-8, v5e-8, v6e-8)")


class LibtpuMissingError(RuntimeError):
    """This Python environment cannot compile for TPU."""


def libtpu_missing_message() -> str:
    return (f"libtpu is not installed in this Python environment ({sys.prefix}). Compiling for TPU needs it, "
            "not a TPU: run launch/setup_env.sh and use .venv-tpu/bin/python (the main venv plus libtpu), "
            "or pip install -e '.[tpu]' in an environment of its own.")


def have_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def slice_devices(sl: Slice) -> list[Any]:
    """The slice's devices, as libtpu describes them (usable in a Mesh for ahead-of-time compiles only)."""
    if not have_libtpu():
        raise LibtpuMissingError(libtpu_missing_message())
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology)
    except Exception as e:  # noqa: BLE001 - libtpu's messages are the useful part
        raise TopologyError(f"--topology={sl.name}: libtpu rejected topology {sl.topology!r}: {e}") from e
    devices = list(desc.devices)
    if len(devices) != sl.chips:
        raise TopologyError(f"--topology={sl.name}: libtpu gave {len(devices)} devices for {sl.topology}, "
                            f"expected {sl.chips} chips")
    return devices


def tpu_python(repo: str) -> str:
    """The interpreter that can compile for TPU: $VISCODEX_TPU_PYTHON, this one if it has libtpu, else
    ``<repo>/.venv-tpu/bin/python`` (launch/setup_env.sh makes it)."""
    env = os.environ.get("VISCODEX_TPU_PYTHON")
    if env:
        return env
    if have_libtpu():
        return sys.executable
    return os.path.join(repo, ".venv-tpu", "bin", "python")
