"""
The machine a run trains on: which device, which autocast dtype, how much memory is free, and its peak FLOPs.

Design choices:
- `--device auto` picks CUDA, then MPS, then the CPU; asking for a device the machine lacks is a UsageError.
- `--dtype auto` is bfloat16 on CUDA cards that support it, else float32; float16 needs a GPU (and a GradScaler).
- Free memory is what the device can still give: on CUDA the driver's free bytes, on the CPU MemAvailable.
- Peak FLOPs are the dense (no sparsity) bf16 tensor-core figures from the vendors' data sheets, most specific
  name first, so MFU means the same in main.py and in bench/. An unknown card has no MFU rather than a wrong one.
"""

import contextlib
from dataclasses import dataclass

import torch

from errors import UsageError

# Dense bf16 peaks (FLOP/s), most specific name first: "H100 PCIe" must match before "H100".
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
)


def pick_device(name: str) -> str:
    """The device `--device name` means on this machine."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UsageError(
            f"--device {name} was asked for, but this machine has no {name.upper()} device; use --device cpu"
        )
    return name


def pick_dtype(device: str, name: str) -> str:
    """The autocast dtype `--dtype name` means on `device`."""
    if name == "auto":
        return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float16" and device == "cpu":
        raise UsageError("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    return name


def autocast(device: str, dtype: str):
    """The context the model's forward runs in: none for float32, else torch.autocast to `dtype`."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def available_memory(device: str) -> int | None:
    """Bytes free for tensors on the device, where that can be known."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def synchronize(device: str) -> None:
    """Wait for the device to finish its queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name()), or None if unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


@dataclass(frozen=True)
class Machine:
    """Where a run computes: the device and the autocast dtype it resolved to."""

    device: str
    dtype: str

    def autocast(self):
        return autocast(self.device, self.dtype)

    @property
    def name(self) -> str:
        """The device as the record names it: the GPU's model on CUDA."""
        return torch.cuda.get_device_name() if self.device == "cuda" else self.device

    @property
    def peak_flops(self) -> float | None:
        return peak_flops(self.name) if self.device == "cuda" else None
