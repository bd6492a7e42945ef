"""Which device runs the networks: ``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from anime_udf.errors import AnimeUdfError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(AnimeUdfError, ValueError):
    """A device was asked for that this machine does not have."""


def check_choice(what: str, name: str, choices: tuple[str, ...]) -> None:
    """A device or precision name, checked without importing torch."""
    if name not in choices:
        raise DeviceError(f"unknown {what} {name!r}: use one of {', '.join(choices)}")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    import torch  # here, so that the CLI's option lists do not import it

    if isinstance(name, torch.device):
        return name
    check_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for, but no CUDA GPU is available here (use --device auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that still include its bf16 kernels.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX in the CPU, and kernels allowed to use them: bf16 matrix multiplies
    run in hardware (else autocast is slower). ``ATEN_CPU_CAPABILITY=avx2`` or
    ``ONEDNN_MAX_CPU_ISA=AVX2`` limit the kernels as on an older CPU, and then it is fp32."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    isa_limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not isa_limit.startswith(_ONEDNN_BF16_ISAS):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False  # not Linux: fp32, the safe choice
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """The transformer's precision, ``fp32`` or ``bf16``: ``auto`` is bf16 on CUDA GPUs and on
    CPUs with native bf16, fp32 elsewhere. The tabular layers and the output always run in fp32."""
    check_choice("precision", name, PRECISIONS)
    if name != "auto":
        return name
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
