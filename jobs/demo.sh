#!/usr/bin/env bash
# The main job on the embedded default: a local Ray instance, a tiny model made here, the bundled persona chats.
# Run from the repository root with rwkvray installed (see README).
set -euo pipefail
rwkvray init-model --n-layer 2 --n-embd 256 --perturb 0.2 --out out/tiny.pth
rwkvray run jobs/demo_state_cpu.yaml
prompt=$'User: What do you see out of the window?\n\nAssistant:'
echo "== without the state"
rwkvray generate --model out/tiny.pth --prompt "$prompt" --max-tokens 24 --temperature 0 --device cpu
echo "== with the tuned state (runs/demo-state-cpu/rwkv-final.pth)"
rwkvray generate --model out/tiny.pth --state runs/demo-state-cpu/rwkv-final.pth --prompt "$prompt" \
  --max-tokens 24 --temperature 0 --device cpu
