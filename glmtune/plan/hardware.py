"""What this machine can do, detected rather than assumed.

Many users' CPUs have no bf16 support: there bf16 autocast is emulated and
slower than fp32, so we only turn it on where the instructions exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

GB = 1024 ** 3


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    logical_cores: int
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cuda_devices: int = 0
    cuda_bf16: bool = False
    total_ram: int = 0        # bytes, the smaller of the machine's and the cgroup's limit
    available_ram: int = 0    # bytes the OS could give us now, within the cgroup limit
    cgroup_limit: int | None = None
    gpus: tuple[Gpu, ...] = ()

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


def _cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int]:
    """(limit, usage) of this container's memory cgroup (v2, else v1); limit None when unlimited."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            raw = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None, 0
        try:
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return int(raw), usage
    return None, 0


def memory() -> tuple[int, int, int | None]:
    """(total, available, cgroup limit) in bytes, respecting a container's limit."""
    import psutil

    vm = psutil.virtual_memory()
    limit, usage = _cgroup_memory()
    if limit is None:
        return vm.total, vm.available, None
    return min(vm.total, limit), max(0, min(vm.available, limit - usage)), limit


def _gpus() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        found.append(Gpu(props.name, total, free, props.major >= 8))
    return tuple(found)


# GLMTUNE_CPU_ISA=avx2 makes glmtune plan as on a CPU without AVX-512 and bf16 (most
# laptops), e.g. to measure that case on a bigger CPU together with oneDNN's and
# MKL's own caps (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2).
_ABOVE_AVX2 = ("avx512", "amx", "bf16")


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = frozenset(line.split(":", 1)[1].split())
            if os.environ.get("GLMTUNE_CPU_ISA", "").lower() == "avx2":
                flags = frozenset(f for f in flags if not f.startswith(_ABOVE_AVX2))
            return flags
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
    gpus = _gpus()
    total, available, limit = memory()
    return Hardware(
        physical_cores=max(1, physical), logical_cores=max(1, logical), cpu_flags=_cpu_flags(),
        cuda_devices=len(gpus), cuda_bf16=bool(gpus and torch.cuda.is_bf16_supported()),
        total_ram=total, available_ram=available, cgroup_limit=limit, gpus=gpus)


def describe(hw: Hardware) -> str:
    cpu = (f"CPU: {hw.physical_cores} physical / {hw.logical_cores} logical cores, bf16 "
           f"{'yes' + (' (AMX)' if hw.cpu_amx else '') if hw.cpu_bf16 else 'no'}")
    ram = (f"RAM: {hw.total_ram / GB:.1f} GB total, {hw.available_ram / GB:.1f} GB available"
           + (f" (container limit {hw.cgroup_limit / GB:.1f} GB)" if hw.cgroup_limit else ""))
    gpus = [f"GPU {i}: {g.name}, {g.total_bytes / GB:.1f} GB ({g.free_bytes / GB:.1f} free), "
            f"bf16 {'yes' if g.bf16 else 'no'}" for i, g in enumerate(hw.gpus)] or ["GPU: none"]
    return "\n".join([cpu, ram, *gpus])


def set_threads(threads: int | None) -> int:
    """Use ``threads`` (default: physical cores) for torch and the OpenMP/MKL pools."""
    import torch

    n = threads or detect().physical_cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    return n
