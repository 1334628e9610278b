"""What this machine can do, detected rather than assumed.

Many users' CPUs have no bf16 support: there bf16 autocast is emulated and
slower than fp32, so we only turn it on where the instructions exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    logical_cores: int
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cuda_devices: int = 0
    cuda_bf16: bool = False

    @property
    def cpu_bf16(self) -> bool:
        # avx512_bf16 / AMX are the instructions that make bf16 matmuls fast on x86;
        # aarch64 has bf16 as a feature flag too.
        return bool(self.cpu_flags & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def cpu_amx(self) -> bool:
        return "amx_bf16" in self.cpu_flags

    @property
    def device(self) -> str:
        return "cuda" if self.cuda_devices else "cpu"

    @property
    def bf16(self) -> bool:
        return self.cuda_bf16 if self.cuda_devices else self.cpu_bf16


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=1)
def detect() -> Hardware:
    import psutil
    import torch

    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:  # a container or taskset may allow fewer cores than the machine has
        allowed = len(os.sched_getaffinity(0))
        physical, logical = min(physical, allowed), min(logical, allowed)
    except AttributeError:
        pass
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Hardware(
        physical_cores=max(1, physical), logical_cores=max(1, logical), cpu_flags=_cpu_flags(),
        cuda_devices=cuda, cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` (default: physical cores) for torch and the OpenMP/MKL pools."""
    import torch

    n = threads or detect().physical_cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    return n
