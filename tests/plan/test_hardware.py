"""Hardware detection on the files the kernel really writes (cgroup v1/v2, /proc/cpuinfo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.plan import hardware
from glmtune.plan.hardware import GB, Hardware

# Flag lines as /proc/cpuinfo prints them (abridged to the flags that matter, in kernel order).
AVX2_LAPTOP = "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
ZEN4 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ARM64 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm"


@pytest.mark.parametrize("line, bf16, amx", [(AVX2_LAPTOP, False, False), (ZEN4, True, False),
                                             (SAPPHIRE_RAPIDS, True, True), (ARM64, True, False)])
def test_bf16_is_read_from_the_cpu_flags(line, bf16, amx, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: x\n{line}\nbogomips\t: 4000\n\n"
                       f"processor\t: 1\n{line}\n")
    hw = Hardware(physical_cores=2, logical_cores=2, cpu_flags=hardware._cpu_flags(cpuinfo))
    assert (hw.cpu_bf16, hw.cpu_amx, hw.bf16) == (bf16, amx, bf16)
    assert ("bf16 no" in hardware.describe(hw)) is not bf16


def test_no_cpuinfo_means_no_bf16(tmp_path):
    assert hardware._cpu_flags(tmp_path / "missing") == frozenset()


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize("files, expected", [
    ({"memory.max": "8589934592", "memory.current": "1073741824"}, (8 * GB, 1 * GB)),  # v2
    ({"memory.max": "max", "memory.current": "1073741824"}, (None, 0)),                  # v2, no limit
    ({"memory/memory.limit_in_bytes": "4294967296",
      "memory/memory.usage_in_bytes": "536870912"}, (4 * GB, GB // 2)),                  # v1
    ({"memory/memory.limit_in_bytes": "9223372036854771712"}, (None, 0)),               # v1 "unlimited"
    ({"memory.max": "6442450944"}, (6 * GB, 0)),                                        # usage unreadable
    ({}, (None, 0)),                                                                    # no cgroup fs
])
def test_container_memory_limit(files, expected, tmp_path):
    assert hardware._cgroup_memory(_cgroup(tmp_path, files)) == expected


def test_memory_respects_the_container_limit(monkeypatch):
    import psutil

    monkeypatch.setattr(hardware, "_cgroup_memory", lambda: (8 * GB, 7 * GB))
    total, available, limit = hardware.memory()
    assert (total, limit) == (min(psutil.virtual_memory().total, 8 * GB), 8 * GB)
    assert available <= 1 * GB  # what is left under the limit, not what the host has free


def test_detect_reports_this_machine():
    hw = hardware.detect()
    assert 1 <= hw.physical_cores <= hw.logical_cores
    assert hw.total_ram > 0 and 0 <= hw.available_ram <= hw.total_ram
    assert hw.device == ("cuda" if hw.cuda_devices else "cpu")


def test_an_avx2_cap_hides_bf16_and_avx512(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(SAPPHIRE_RAPIDS + "\n")
    monkeypatch.setenv("GLMTUNE_CPU_ISA", "avx2")
    flags = hardware._cpu_flags(cpuinfo)
    assert "avx2" in flags and not any(f.startswith(("avx512", "amx")) for f in flags)
    assert not Hardware(physical_cores=2, logical_cores=2, cpu_flags=flags).cpu_bf16
