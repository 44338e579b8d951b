#!/usr/bin/env bash
# The main job on the embedded default data set (scikit-learn's digits): train a base model,
# train the retrain oracle, then make the model forget class 3 and compare with the oracle.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .

GIF=.venv/bin/gif
OUT=${1:-runs/demo}
mkdir -p "$OUT"
$GIF train configs/digits.yaml -o "$OUT/base.safetensors" --force
$GIF evaluate configs/digits.yaml --checkpoint "$OUT/base.safetensors"
