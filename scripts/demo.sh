#!/usr/bin/env bash
# The main job on the embedded default data set (scikit-learn's digits, no download): train a
# base model and its retrain oracle, make the model forget class 3 with GIF, and print the
# report. Outputs go to runs/demo (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .

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
