#!/usr/bin/env bash
# What a first run on a GPU needs measured, in one command: at most 8 minutes on one H100/H200, nothing downloaded.
#
#     bash bench/gpu.sh [--budget 480] [--train_seconds 60] [--skip PHASE,...] [--data FILE] [--wheels DIR] [--out DIR]
#     bash bench/gpu.sh --cpu      # the dry run: the same phases at tiny shapes on the CPU (CI runs it)
#
# Plan, in order. Estimates are for one H100/H200 with a cold compile cache; a phase starts only if its estimate
# fits in what is left of the budget (default 480 s) and is stopped at its limit; what does not fit is skipped and
# named in the last line. Training phases add --train_seconds (T, default 60 s) to both figures.
#
# | phase          | estimate | limit  | what it does                                                               |
# | preflight      | 10 s     | 60 s   | python, torch, the card, its peak FLOPs; clearml for main.py (--wheels DIR)|
# | tests          | 45 s     | 90 s   | tests/test_model.py -k cuda (Muon's compiled update among them), no xdist |
# | step-default   | 60 s     | 120 s  | 6x384, T256, B32, vocab 4096: ours (modern + Muon) and the GPT-2 baseline  |
# |                |          |        | (--arch gpt2, fused AdamW): compile time, tokens/s, MFU, peak memory       |
# |                |          |        | against training_memory(), graphs and graph breaks, host syncs per step    |
# | train-ours     | T + 55 s | T+120 s| main.py --max_seconds T at the default shape, 10 evaluations, 5 steps      |
# |                |          |        | profiled (H2D copy kind, syncs/step, GPU idle, attention kernel); then     |
# |                |          |        | --eval_only --resume: held-in (the file's val split) and held-out bpb      |
# | train-baseline | T + 55 s | T+120 s| the same with --arch gpt2 --optimizer adamw (run only with train-ours)     |
# | step-124M      | 100 s    | 170 s  | 12x768, T1024, B16, vocab 50304: as step-default (two compiles ~40 s)      |
#
# Total with T = 60: about 445 s of the 480. Loss per second (the figure that matters) comes before the 124M shape;
# if compiles run slow, step-124M is the phase that is skipped, and `--skip tests,step-default,train-ours,
# train-baseline --budget 200` measures it in a second run. The training text is 2.1 MB (0.47 M training tokens),
# which a GPU passes over a hundred times or more in 60 s: the line says how many passes; --data takes a larger file.
# The CUDA tests and each phase's TORCH_LOGS=recompiles,graph_breaks counts go into the details.
#
# main.py needs clearml. On a machine without it and without network, bring its wheels (made where pip works, for
# the machine's Python, e.g. 3.12) and pass --wheels DIR; they are installed into the run's own folder:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d DIR \
#         clearml furl orderedmultidict pathlib2 pyjwt jsonschema jsonschema-specifications referencing rpds-py
# (the rest of what clearml needs, numpy, requests, psutil, PyYAML and so on, comes with PyTorch images).
#
# Output: progress on stderr, one line of figures last on stdout; with $OUT set (or --out DIR) the details:
# gpu-check.json, gpu-check.log, gpu-check.txt and the two profiler traces. Exit 0 when every phase that ran
# passed, 1 when one failed or was stopped, 2 for a bad argument or no CUDA device, 130 when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$python" bench/gpu_check.py "$@"
