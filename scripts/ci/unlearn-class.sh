#!/usr/bin/env bash
# CI gate: make a trained model forget a class, and fail the build when the edit did not forget
# or cost too much utility. Adapt the settings below, or set them in the CI job's environment;
# extra arguments are KEY=VALUE config overrides passed to every gif command, e.g.
#
#   CONFIG=configs/my-model.yaml CLASS=7 scripts/ci/unlearn-class.sh influence.max_iter=40
#
# The base checkpoint is reused when it exists (cache it between builds), else trained. With
# ORACLE set, the retrain oracle is reused or trained too, and the gap to it is gated.
# Everything the edit writes stays in OUT_DIR: keep it as a build artefact.
#
# Exit codes (gif's own): 0 every gate holds; 1 an input or run problem; 2 a usage error;
# 3 the edit ran and its outputs are in OUT_DIR, but a gate failed.
set -euo pipefail

# gif from the project's .venv when run from a clone, else from PATH (or set GIF=...)
if [ -z "${GIF:-}" ]; then
  here=$(cd "$(dirname "$0")/../.." && pwd)
  if [ -x "$here/.venv/bin/gif" ]; then GIF="$here/.venv/bin/gif"; else GIF=gif; fi
fi
CONFIG=${CONFIG:-configs/digits.yaml}
CLASS=${CLASS:-3}                               # the class to forget
BASE=${BASE:-runs/ci/base.safetensors}          # trained model: reused, or trained here
ORACLE=${ORACLE:-}                              # retrain oracle: reused or trained if set
OUT_DIR=${OUT_DIR:-runs/ci/remove-class-$CLASS}

# The gates, in percent of the test split (see "Using gif in CI" in the README).
MAX_FORGET_ACC=${MAX_FORGET_ACC:-1}             # forgotten class still recognised at most
MAX_RETAIN_DROP=${MAX_RETAIN_DROP:-2}           # retained classes' accuracy lost at most
MAX_PARAMS_FRACTION=${MAX_PARAMS_FRACTION:-0.05}  # share of parameters changed at most
MAX_ORACLE_GAP=${MAX_ORACLE_GAP:-5}             # mean |after - oracle| at most (with ORACLE)

overrides=("checkpoint=$BASE" "removal.classes=[$CLASS]" "$@")

if [ -f "$BASE" ]; then
  echo "reusing base checkpoint $BASE"
else
  "$GIF" train "$CONFIG" "${overrides[@]}" -o "$BASE"
fi

gates=(
  --check "after.forget_acc_test<=$MAX_FORGET_ACC"
  --check "after.retain_acc_test>=before.retain_acc_test-$MAX_RETAIN_DROP"
  --check "params.fraction<=$MAX_PARAMS_FRACTION"
)
if [ -n "$ORACLE" ]; then
  if [ ! -f "$ORACLE" ]; then
    "$GIF" train "$CONFIG" "${overrides[@]}" --retrain -o "$ORACLE"
  fi
  gates+=(--oracle "$ORACLE" --check "gap.mean<=$MAX_ORACLE_GAP")
fi

status=0
"$GIF" remove-class "$CONFIG" "${overrides[@]}" "output.dir=$OUT_DIR" --force "${gates[@]}" \
  || status=$?
case $status in
  0|3) echo "artefacts: $OUT_DIR (report.md, report.json, model.safetensors)" ;;
esac
exit "$status"
