#!/usr/bin/env bash
# The main job on the embedded default data set (scikit-learn's digits, no download): train a
# base model and its retrain oracle, make the model forget class 3 with GIF, and print the
# report. Outputs go to runs/demo (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/gif ]; then  # installed once; scripts/test.sh reinstalls
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --upgrade pip
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet -e .
fi

GIF=.venv/bin/gif
OUT=${1:-runs/demo}
CONFIG=configs/digits.yaml
mkdir -p "$OUT"
$GIF train "$CONFIG" -o "$OUT/base.safetensors" --force
$GIF train "$CONFIG" --retrain -o "$OUT/oracle.safetensors" --force
$GIF remove-class "$CONFIG" checkpoint="$OUT/base.safetensors" output.dir="$OUT/remove-class" \
  --oracle "$OUT/oracle.safetensors" --force
echo
cat "$OUT/remove-class/report.md"
