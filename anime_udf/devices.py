"""Which device runs the networks: ``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from anime_udf.errors import AnimeUdfError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(AnimeUdfError, ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    import torch  # here, so that the CLI's option lists do not import it

    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for, but no CUDA GPU is available here (use --device auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
