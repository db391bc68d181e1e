"""One line naming the machine a benchmark ran on, for every bench script to print first."""

import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    try:
        import torch

        capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
        extra = f", torch {torch.__version__} ({capability}, {threads} threads)"
    except ImportError:
        extra = ""
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}{extra}"
