"""Config + hardware -> the concrete settings a run uses, with the reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

from glmtune.config import TrainConfig
from glmtune.errors import GlmtuneError
from glmtune.hardware import Hardware


@dataclass
class Plan:
    device: str
    bf16: bool
    threads: int
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = f"device={self.device} bf16={'on' if self.bf16 else 'off'} threads={self.threads}"
        return head + "".join(f"\n  - {r}" for r in self.reasons)


def make_plan(config: TrainConfig, hw: Hardware) -> Plan:
    reasons = []
    if config.quant != "none":
        raise GlmtuneError(f"quant: '{config.quant}' quantization is not available in this "
                           "version of glmtune yet; use --quant none (QUANT_LEVEL=none)")
    if config.bf16 == "auto":
        bf16 = hw.bf16
        where = "GPU" if hw.cuda_devices else "CPU"
        reasons.append(f"bf16 autocast {'on' if bf16 else 'off'}: the {where} "
                       f"{'supports' if bf16 else 'lacks'} fast bf16"
                       + ("" if hw.cuda_devices else " (avx512_bf16 / AMX)"))
    else:
        bf16 = config.bf16 == "true"
        reasons.append(f"bf16 autocast {'on' if bf16 else 'off'}: set by --bf16")
        if bf16 and not hw.bf16 and not hw.cuda_devices:
            reasons.append("warning: this CPU has no native bf16; bf16 will be slower than fp32")
    threads = config.threads or hw.physical_cores
    reasons.append(f"{threads} CPU threads" + ("" if config.threads else " (physical cores)"))
    return Plan(device=hw.device, bf16=bf16, threads=threads, reasons=reasons)
