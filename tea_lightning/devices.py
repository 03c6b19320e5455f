"""The device a command runs on: the one the user named, checked to exist here, or CUDA when present."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a `torch.device` (None or "auto": CUDA when present, else the CPU). A name torch does not know,
    or a GPU this machine does not have, is an error naming it and the fix, raised before any model loads."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a device torch knows ({error}); use cpu, cuda or cuda:1, or "
                         "leave it unset.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA GPU here (torch.cuda.is_available() is False). "
                         "Use --device cpu, or leave --device unset.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA GPU(s) are visible; use "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but Apple's MPS backend is not available here; use --device cpu.")
    return resolved
