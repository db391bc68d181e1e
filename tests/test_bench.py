"""bench/gpu.sh runs on a GPU machine that may be lent for minutes only: its CPU dry run proves every phase works
first, and what it reads on a GPU (profiler traces, torch.compile's logs) is checked here on traces of that form."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import trace_summary  # noqa: E402

PHASES = [phase.name for phase in gpu_check.PHASES]


def gpu_sh(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu.sh", "--cpu", *args],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_dry_run_runs_every_phase_and_prints_one_line_of_figures(tmp_path):
    result = gpu_sh("--out", str(tmp_path), "--train_seconds", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    contender = r"[\d,]+ tok/s MFU n/a compile \d+ s memory/estimate n/a"
    shape = rf"\d+x\d+ T\d+ B\d+: ours {contender}, baseline {contender}, \d+\.\d\dx, graphs/breaks \d+/\d+ \d+/\d+"
    bpb = r"bpb ours \d\.\d{3} baseline \d\.\d{3} \(\d\.\d{3}x\)"
    profiled = r"[\d.]+ ms/step, no GPU events, attention aten::_scaled_dot_product_flash_attention_for_cpu"
    assert re.fullmatch(
        rf"gpu-check cpu: CPU \(dry run: the figures mean nothing\), torch \S+, \d+ s of 240 \| tests [1-9]\d* passed"
        rf" \| default {shape} \| gpt2-124M {shape} \| 1 s training: held-in {bpb}, held-out {bpb}, best val bpb "
        rf"during the runs \d\.\d{{3}}/\d\.\d{{3}}, trained \S+ s, [\d.]+ (of one pass|passes) over [\d.]+ M tokens"
        rf"( \(a small text repeated: overfitting counts\))? \| profile ours {profiled}; "
        rf"baseline {profiled} \| training recompiles/graph breaks: ours \d+/\d+, baseline \d+/\d+ \| "
        r"failed: none \| skipped: none",
        lines[0],
    ), lines[0]

    details = json.loads((tmp_path / "gpu-check.json").read_text())
    assert details["line"] == lines[0]
    assert {name: details["phases"][name]["status"] for name in PHASES} == dict.fromkeys(PHASES, "ok")
    for name in ("ours", "baseline"):
        run = details["phases"][f"train-{name}"]
        assert run["profile"]["steps"] == 5 and (tmp_path / f"trace-{name}.json.gz").is_file()
        assert len(run["curve"]) >= 3 and run["max_steps"] == run["curve"][-1]["step"]
    log = (tmp_path / "gpu-check.log").read_text()
    assert all(f"===== {name}\n" in log for name in ["preflight", "tests", "step-default", "train-ours"])


@pytest.mark.timeout(60)
def test_what_does_not_fit_the_budget_is_skipped_and_named():
    result = gpu_sh("--budget", "5")  # the preflight always runs; every other phase needs more than 5 s
    assert result.returncode == 0, result.stderr
    skipped = re.search(r"\| skipped: (.*)$", result.stdout.strip())[1]
    assert re.findall(r"(\S+) \(needs ~\d+ s, \d+ s left\)", skipped) == PHASES


@pytest.mark.timeout(90)
def test_a_failed_training_phase_is_named_and_its_baseline_not_run(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    result = gpu_sh("--data", str(binary), "--skip", "tests,step-default,step-124M")
    assert result.returncode == 1
    line = result.stdout.strip()
    assert re.search(r"\| failed: train-ours \(exit code 2: .*--data .*\) \|", line), line
    assert "train-baseline (train-ours did not complete: a baseline alone compares nothing)" in line


@pytest.mark.timeout(60)
def test_sigterm_stops_the_running_phase_and_still_prints_the_line():
    process = subprocess.Popen(
        ["bash", "bench/gpu.sh", "--cpu", "--skip", "step-default,train-ours,train-baseline,step-124M"],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "tests: started" in line:
            break
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=20)
    assert process.returncode == 130
    assert stdout.strip().endswith("| interrupted: tests (stopped by a signal)"), stdout


@pytest.mark.timeout(30)
def test_bad_arguments_are_one_line_and_exit_2():
    result = gpu_sh("--skip", "tests,warp-drive")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("--skip warp-drive: no such phase; the phases are " + ", ".join(PHASES))
    )


def test_the_plan_in_gpu_sh_is_the_one_gpu_check_runs():
    rows = re.findall(
        r"^# \| (\S+)\s+\| (?:T \+ )?(\d+) s\s+\| (?:T ?\+ ?)?(\d+) s", (ROOT / "bench/gpu.sh").read_text(), re.M
    )
    assert [(name, float(estimate), float(limit)) for name, estimate, limit in rows[1:]] == [
        (phase.name, *phase.gpu) for phase in gpu_check.PHASES
    ]
    assert rows[0] == ("preflight", "10", str(gpu_check.PREFLIGHT_LIMIT))


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


@pytest.mark.timeout(60)
def test_torch_compile_logs_are_counted_as_recompiles_and_graph_breaks():
    program = textwrap.dedent("""
        import torch

        @torch.compile(backend="eager")
        def scaled(x, factor):
            y = x.sin()
            print("a graph break")
            return y * factor

        scaled(torch.ones(3), 2)
        scaled(torch.ones(3), 3)  # another constant: a recompile
    """)
    env = os.environ | {"TORCH_LOGS": "recompiles,graph_breaks"}
    log = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=50).stderr
    events = gpu_check.dynamo_events(log)
    assert (events["recompiles"], events["graph_breaks"]) == (1, 1), log
    assert events["graph_break_lines"][0].startswith("Graph break in user code at <string>:")
    assert events["recompile_lines"][0].startswith("Recompiling function torch_dynamo_resume_in_scaled")
    assert "factor == 2" in events["recompile_reasons"][0]


def test_the_line_of_a_gpu_run_reads_its_figures(tmp_path):
    """What only a GPU gives (MFU, memory, the GPU side of the profile) goes into the line as a CUDA run has it."""
    args = argparse.Namespace(cpu=False, budget=480.0, train_seconds=60.0, profile_after=30)
    check = gpu_check.Check(args, tmp_path)

    def contender(tokens_per_s: float, graphs: int) -> dict:
        return dict(tokens_per_s=tokens_per_s, mfu=0.4123, compile_s=31.4, peak_memory=3 * 2**30,
                    memory_estimate=4 * 2**30, graphs=graphs, graph_breaks=0, syncs_per_step=0.0)  # fmt: skip

    step = {"label": "gpt2-124M 12x768 T1024 B16", "ours": contender(400_000, 4), "baseline": contender(500_000, 1)}
    profile = trace_summary.summarize(cuda_like_trace())
    curve = [dict(step=s, tokens=8192 * s, elapsed=10 + s / 200, bpb=2.0 - s / 20_000) for s in (0, 1000, 12_000)]

    def run(bpb: float) -> dict:
        result = dict(status="ok", training_tokens=470_000, curve=curve, profile=profile)
        result |= dict(
            held_in={"bpb": bpb}, held_out={"bpb": bpb + 0.1}, dynamo_log={"recompiles": 1, "graph_breaks": 0}
        )
        return result | gpu_check.training_figures(result)

    check.results = {
        "preflight": {"status": "ok", "card": "NVIDIA H200", "torch": "2.11.0", "clearml": "2.1.12"},
        "tests": {"status": "ok", "counts": {"passed": 9}},
        "step-default": {"status": "skipped", "reason": "--skip"},
        "train-ours": run(1.2),
        "train-baseline": run(1.5),
        "step-124M": {"status": "ok", **step, "ratio": 0.8},
    }
    contender_figures = "tok/s MFU 41.2% compile 31 s memory/estimate 0.75, 0 syncs/step"
    profiled = trace_summary.describe(profile)
    assert gpu_check.summary_line(check) == (
        "gpu-check cuda: NVIDIA H200, torch 2.11.0, 0 s of 480 | tests 9 passed | gpt2-124M 12x768 T1024 B16: "
        f"ours 400,000 {contender_figures}, baseline 500,000 {contender_figures}, 0.80x, graphs/breaks 4/0 1/0 | "
        "60 s training: held-in bpb ours 1.200 baseline 1.500 (0.800x), held-out bpb ours 1.300 baseline 1.600 "
        "(0.812x), best val bpb during the runs 1.400/1.400, trained 60/60 s, 209 passes over 0.47 M tokens "
        "(a small text repeated: overfitting counts) | "
        f"profile ours {profiled}; baseline {profiled} | training recompiles/graph breaks: ours 1/0, baseline 1/0 | "
        "failed: none | skipped: step-default (--skip)"
    )


def test_a_signal_while_a_phase_starts_waits_until_its_process_can_be_killed():
    stop = gpu_check.Stop()
    with stop.deferred():
        stop(signal.SIGTERM, None)  # while Popen runs: no exception, the child would be left unkilled
    with pytest.raises(KeyboardInterrupt):
        stop.take_pending()
    stop.take_pending()  # taken once
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)
