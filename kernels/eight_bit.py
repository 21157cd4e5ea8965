"""Which 8-bit path of the block-sparse kernel a device can run, and why not when it cannot.

FP8 e4m3 matrix products need an Ada (sm_89), Hopper or Blackwell GPU and a Triton that has ``tl.float8e4nv``;
INT8 ones an Ampere (sm_80) GPU or newer. Both need Triton 3.3 or newer (the oldest Triton the pack supports).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What the user picks. EIGHT_BIT_DENSE: 8-bit as '8-bit', and the video self-attention calls the schedule keeps dense
# run on the 8-bit kernel at a full layout too, instead of the user's own attention (core.dense_8bit).
EIGHT_BIT_DENSE = "8-bit + dense calls"
PRECISIONS = ("bf16", "8-bit", "auto", EIGHT_BIT_DENSE)
KERNEL_PRECISIONS = ("bf16", "fp8", "int8")  # what the kernel runs
MIN_TRITON = (3, 3)
FP8_CAPABILITY = (8, 9)
INT8_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class EightBitSupport:
    """``precision``: 'fp8', 'int8' or 'bf16' (no 8-bit units or no Triton for them); ``reason``: a sentence
    naming what runs and, for 'bf16', what is missing."""

    precision: str
    reason: str


def _triton_version() -> tuple[int, int] | None:
    try:
        import triton
    except ImportError:
        return None
    parts = triton.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _triton_has_fp8() -> bool:
    import triton.language as tl

    return hasattr(tl, "float8e4nv")


def eight_bit_support(device: torch.device | str) -> EightBitSupport:
    """The 8-bit path this device runs: FP8 where the GPU and Triton have it, else INT8, else bf16 with why."""
    device = torch.device(device)
    if device.type != "cuda":
        return EightBitSupport("bf16", f"8-bit attention needs an NVIDIA GPU (the tensors are on {device})")
    version = _triton_version()
    if version is None:
        return EightBitSupport("bf16", "8-bit attention needs Triton, which is not installed")
    if version < MIN_TRITON:
        return EightBitSupport("bf16", f"8-bit attention needs Triton {MIN_TRITON[0]}.{MIN_TRITON[1]} or newer "
                                       f"(installed: {version[0]}.{version[1]})")
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability >= FP8_CAPABILITY and _triton_has_fp8():
        return EightBitSupport("fp8", f"FP8 e4m3 attention on {name} (sm_{capability[0]}{capability[1]})")
    if capability >= INT8_CAPABILITY:
        why = "" if capability < FP8_CAPABILITY else " (this Triton has no float8e4nv type)"
        return EightBitSupport("int8", f"INT8 attention on {name} (sm_{capability[0]}{capability[1]}){why}")
    return EightBitSupport("bf16", f"8-bit attention needs an Ampere (sm_80) or newer GPU; {name} is "
                                   f"sm_{capability[0]}{capability[1]}")
