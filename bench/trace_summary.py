"""
What a torch.profiler trace of a few training steps says about them: how the batches reach the GPU, how often the
host waits for the GPU, how long the GPU sits idle, and which attention kernel ran.

    python bench/trace_summary.py TRACE.json[.gz]

Reads the Chrome trace that `torch.profiler.profile.export_chrome_trace` writes. Kineto's event categories:
`kernel`, `gpu_memcpy` and `gpu_memset` run on the GPU; `cuda_runtime` and `cuda_driver` are the host's CUDA calls;
`cpu_op` are ATen ops; `user_annotation` holds the `ProfilerStep#N` spans that `profiler.step()` marks.
- Host-to-device copies: Kineto names them `Memcpy HtoD (Pinned -> Device)` or `Memcpy HtoD (Pageable -> Device)`.
  A pageable source goes through a staging buffer, so the host waits for the copy and it cannot overlap compute.
- Synchronisations: the host calls that wait for the GPU, `cuda*Synchronize` (what `.item()`, `.cpu()` and
  `torch.cuda.synchronize()` end in) and the blocking `cudaMemcpy`.
- GPU idle share: the share of the profiled steps' wall time (from the first step's start to the last one's end on
  the host's clock, which Kineto aligns with the GPU's) in which no kernel, copy or memset ran on any stream.
- Attention: the ATen scaled-dot-product op that ran (its name names the backend: flash, efficient, cudnn, or the
  CPU's) and the GPU kernel with the most time among those named like attention.
A trace without GPU events (a CPU run) has None for the copies, synchronisations, idle share and kernels.
"""

import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CUDA_CATEGORIES = {"cuda_runtime", "cuda_driver"}
BLOCKING_COPIES = {"cudaMemcpy", "cudaMemcpy2D", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2"}
STEP = re.compile(r"ProfilerStep#\d+")
STEP_CATEGORIES = {"user_annotation", "cpu_op"}  # the host's span; a CUDA trace repeats it as gpu_user_annotation
ATTENTION_OP = re.compile(r"aten::_scaled_dot_product_\w+")
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa", re.IGNORECASE)


def read_trace(path: Path) -> dict:
    """A Chrome trace file, gzipped (.gz) or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def short_kernel_name(name: str) -> str:
    """`void ns::kernel<templates...>(args)` -> `ns::kernel`: the part of a C++ kernel name that says what it is."""
    name = name.removeprefix("void ")
    return re.split(r"[<(]", name, maxsplit=1)[0].strip() or name


def busy_time(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals`, clipped to [start, end]."""
    busy, reached = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reached), min(b, end)
        if b > a:
            busy += b - a
            reached = b
    return busy


def step_window(events: list[dict]) -> tuple[float, float, int]:
    """Start, end (µs) and number of the ProfilerStep spans, the steps the profiler recorded; without any (no
    schedule), the whole trace as one step."""
    steps = [e for e in events if STEP.fullmatch(e["name"]) and e.get("cat") in STEP_CATEGORIES]
    spans = steps or events
    if not spans:
        return 0.0, 0.0, 1
    return min(e["ts"] for e in spans), max(e["ts"] + e.get("dur", 0) for e in spans), len(steps) or 1


def host_to_device(copies: list[dict], steps: int) -> dict:
    """How many host-to-device copies a step makes, of how many bytes, and from what kind of host memory."""
    uploads = [e for e in copies if "htod" in e["name"].lower()]
    pinned = sum("pinned" in e["name"].lower() for e in uploads)
    pageable = sum("pageable" in e["name"].lower() for e in uploads)
    kind = "none"
    if uploads:
        kind = "pinned" if pinned == len(uploads) else "pageable" if pageable == len(uploads) else "mixed"
    return {
        "kind": kind,
        "pinned": pinned,
        "pageable": pageable,
        "copies_per_step": len(uploads) / steps,
        "bytes_per_step": sum(e.get("args", {}).get("bytes", 0) for e in uploads) / steps,
    }


def attention(events: list[dict], kernels: list[dict]) -> tuple[str | None, str | None]:
    """The forward scaled-dot-product ATen op most called, and the attention-like kernel with the most GPU time."""
    ops = Counter(e["name"] for e in events if e.get("cat") == "cpu_op" and ATTENTION_OP.fullmatch(e.get("name", "")))
    forward = [name for name, _ in ops.most_common() if not name.endswith("_backward")]
    times = Counter()
    for e in kernels:
        if ATTENTION_KERNEL.search(e["name"]) and not e["name"].startswith("triton_"):
            times[short_kernel_name(e["name"])] += e.get("dur", 0)
    return (forward[0] if forward else None), (times.most_common(1)[0][0] if times else None)


def summarize(trace: dict) -> dict:
    """The figures of the module docstring, per profiled step."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e and "name" in e]
    start, end, steps = step_window(events)
    inside = [e for e in events if start <= e["ts"] < end]
    gpu = [e for e in inside if e.get("cat") in GPU_CATEGORIES]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    attention_op, attention_kernel = attention(inside, kernels)
    summary = {
        "steps": steps,
        "step_ms": (end - start) / steps / 1000,  # with the profiler's own overhead
        "attention_op": attention_op,
        "attention_kernel": attention_kernel,
        "gpu": bool(gpu),
        "h2d": None,
        "syncs_per_step": None,
        "syncs": {},
        "gpu_idle_share": None,
        "kernels_per_step": None,
        "top_kernels": [],
    }
    if not gpu:
        return summary
    host_calls = [e["name"] for e in inside if e.get("cat") in HOST_CUDA_CATEGORIES]
    syncs = Counter(name for name in host_calls if name.endswith("Synchronize") or name in BLOCKING_COPIES)
    kernel_time = Counter()
    for e in kernels:
        kernel_time[short_kernel_name(e["name"])] += e.get("dur", 0)
    busy = busy_time([(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu], start, end)
    summary.update(
        h2d=host_to_device([e for e in gpu if e["cat"] == "gpu_memcpy"], steps),
        syncs_per_step=sum(syncs.values()) / steps,
        syncs=dict(syncs),
        gpu_idle_share=1 - busy / (end - start) if end > start else None,
        kernels_per_step=len(kernels) / steps,
        top_kernels=[(name, us / 1000 / steps) for name, us in kernel_time.most_common(8)],
    )
    return summary


def describe(summary: dict) -> str:
    """The summary as a few words for the one line of figures."""
    attention_name = summary["attention_kernel"] or summary["attention_op"] or "none found"
    if not summary["gpu"]:
        return f"{summary['step_ms']:.1f} ms/step, no GPU events, attention {attention_name}"
    h2d, steps = summary["h2d"], summary["steps"]
    copies = f"{h2d['pinned'] / steps:.1f} pinned + {h2d['pageable'] / steps:.1f} pageable"
    return (
        f"H2D {h2d['kind']} ({copies} /step), {summary['syncs_per_step']:.1f} syncs/step, "
        f"GPU idle {100 * summary['gpu_idle_share']:.0f}%, {summary['kernels_per_step']:.0f} kernels/step, "
        f"attention {attention_name}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} TRACE.json[.gz]")
    result = summarize(read_trace(Path(sys.argv[1])))
    print(json.dumps(result, indent=1))
    print(describe(result))
