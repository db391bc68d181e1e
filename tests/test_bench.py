"""bench/gpu.sh runs on a GPU machine that may be lent for minutes only: its CPU dry run proves it works first, and
what it reads on a GPU (profiler traces) is checked here on traces of that form."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import trace_summary  # noqa: E402

CONTENDER = r"[\d,]+ tok/s MFU n/a compile \d+ s"
FIGURES = rf"\d+x\d+ T\d+ B\d+: ours {CONTENDER}, baseline {CONTENDER}, \d+\.\d\dx"
LINE = (
    rf"gpu-step cpu \(CPU\), fp32, dynamo eager \| default {FIGURES} \| "
    rf"gpt2-124M {FIGURES} \| tests: [1-9]\d* passed \(cpu\)"
)


def test_gpu_script_dry_run_prints_one_line_of_figures():
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--cpu"],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(LINE, lines[0]), result.stdout


def cuda_like_trace() -> dict:
    """Two profiled steps of 1 ms in Kineto's Chrome-trace form, with GPU work as a CUDA run records it."""

    def event(cat: str, name: str, ts: float, dur: float, **args) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [event("user_annotation", f"ProfilerStep#{n}", 1000 * i, 1000) for i, n in enumerate((30, 31))]
    events.append(event("gpu_user_annotation", "ProfilerStep#31", 1100, 1500))  # the GPU's view of a step
    flash = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>(Flash_fwd_params)"
    for start, source in ((0, "Pinned"), (1000, "Pageable")):
        events += [
            event("gpu_memcpy", f"Memcpy HtoD ({source} -> Device)", start + 50, 50, bytes=8192),
            event("kernel", flash, start + 100, 200),
            event("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32", start + 300, 400),
            event("kernel", "triton_poi_fused_add_mul_0", start + 600, 200),  # on another stream, overlapping
            event("cuda_runtime", "cudaLaunchKernel", start + 10, 5),
            event("cuda_runtime", "cudaMemcpyAsync", start + 20, 5),
            event("cuda_runtime", "cudaStreamSynchronize", start + 900, 50),
            event("cpu_op", "aten::scaled_dot_product_attention", start + 90, 30),
            event("cpu_op", "aten::_scaled_dot_product_flash_attention", start + 95, 20),
            event("cpu_op", "aten::_scaled_dot_product_flash_attention_backward", start + 500, 20),
        ]
    events.append(event("kernel", "a kernel of a later step", 5000, 100))
    return {"traceEvents": events}


def test_trace_summary_reads_copies_syncs_idle_time_and_attention_from_a_cuda_trace():
    summary = trace_summary.summarize(cuda_like_trace())
    assert summary["steps"] == 2 and summary["step_ms"] == 1.0
    assert summary["h2d"] == {
        "kind": "mixed",
        "pinned": 1,
        "pageable": 1,
        "copies_per_step": 1.0,
        "bytes_per_step": 8192,
    }
    assert summary["syncs_per_step"] == 1.0 and summary["syncs"] == {"cudaStreamSynchronize": 2}
    assert summary["gpu_idle_share"] == pytest.approx(0.25)  # busy from 50 to 800 µs of each 1000
    assert summary["kernels_per_step"] == 3
    assert summary["attention_op"] == "aten::_scaled_dot_product_flash_attention"
    assert summary["attention_kernel"] == "pytorch_flash::flash_fwd_kernel"
    assert summary["top_kernels"][0] == ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.4)
    assert trace_summary.describe(summary) == (
        "H2D mixed (0.5 pinned + 0.5 pageable /step), 1.0 syncs/step, GPU idle 25%, 3 kernels/step, "
        "attention pytorch_flash::flash_fwd_kernel"
    )


def test_trace_summary_of_a_real_cpu_trace_counts_its_profiled_steps(tmp_path):
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    when = schedule(skip_first=2, wait=0, warmup=1, active=3, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=when) as prof:
        for _ in range(8):
            q = torch.randn(1, 2, 8, 8)
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            model(torch.randn(4, 16)).sum().backward()
            optimizer.step()
            prof.step()
    prof.export_chrome_trace(str(tmp_path / "trace.json.gz"))
    summary = trace_summary.summarize(trace_summary.read_trace(tmp_path / "trace.json.gz"))
    assert summary["steps"] == 3 and not summary["gpu"] and summary["gpu_idle_share"] is None
    assert summary["attention_op"] == "aten::_scaled_dot_product_flash_attention_for_cpu"
