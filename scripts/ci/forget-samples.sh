#!/usr/bin/env bash
# CI gate: make a trained model forget a list of training samples (a deletion request), and
# fail the build when the edit cost too much utility or, against the retrain oracle, did not
# land near it. Adapt the settings below, or set them in the CI job's environment; extra
# arguments are KEY=VALUE config overrides passed to every gif command, e.g.
#
#   INDICES=deletion-request.txt ORACLE=runs/ci/samples-oracle.safetensors \
#     scripts/ci/forget-samples.sh influence.max_iter=40
#
# INDICES lists training indices (one per line, counted from 0 in the data set's training split
# before the validation split is held out); without it the config's removal set is used
# (configs/digits-samples.yaml: a random 5%). The base checkpoint is reused when it exists
# (cache it between builds), else trained. With ORACLE set, the retrain oracle (trained without
# the samples) is reused or trained too, and the gaps to it are gated: the oracle's accuracy on
# the forgotten samples is the target, not 0. An oracle belongs to one removal set: give each
# deletion request its own ORACLE path. Everything the edit writes stays in OUT_DIR: keep it as
# a build artefact.
#
# Exit codes (gif's own): 0 every gate holds; 1 an input or run problem; 2 a usage error;
# 3 the edit ran and its outputs are in OUT_DIR, but a gate failed.
set -euo pipefail

GIF=${GIF:-gif}
CONFIG=${CONFIG:-configs/digits-samples.yaml}
INDICES=${INDICES:-}                            # file of training indices; empty: the config's
BASE=${BASE:-runs/ci/base.safetensors}          # trained model: reused, or trained here
ORACLE=${ORACLE:-}                              # retrain oracle: reused or trained if set
OUT_DIR=${OUT_DIR:-runs/ci/remove-samples}

# The gates, in percent (see "Using gif in CI" in the README).
MAX_TEST_DROP=${MAX_TEST_DROP:-1}               # test accuracy lost at most
MAX_RETAIN_DROP=${MAX_RETAIN_DROP:-1}           # accuracy on the retained training samples lost
MAX_PARAMS_FRACTION=${MAX_PARAMS_FRACTION:-0.05}  # share of parameters changed at most
MAX_FORGET_GAP=${MAX_FORGET_GAP:-3}             # |forget acc - oracle's| at most (with ORACLE)
MAX_ORACLE_GAP=${MAX_ORACLE_GAP:-3}             # mean |after - oracle| at most (with ORACLE)

overrides=("checkpoint=$BASE" "$@")
if [ -n "$INDICES" ]; then
  # the same removal set for the oracle's training and the edit
  overrides=("removal.indices=\"$INDICES\"" "removal.random=null" "${overrides[@]}")
fi

if [ -f "$BASE" ]; then
  echo "reusing base checkpoint $BASE"
else
  "$GIF" train "$CONFIG" "${overrides[@]}" -o "$BASE"
fi

gates=(
  --check "after.acc_test>=before.acc_test-$MAX_TEST_DROP"
  --check "after.retain_acc_train>=before.retain_acc_train-$MAX_RETAIN_DROP"
  --check "params.fraction<=$MAX_PARAMS_FRACTION"
)
if [ -n "$ORACLE" ]; then
  if [ ! -f "$ORACLE" ]; then
    "$GIF" train "$CONFIG" "${overrides[@]}" --retrain -o "$ORACLE"
  fi
  gates+=(--oracle "$ORACLE" --check "gap.forget_acc_train<=$MAX_FORGET_GAP"
    --check "gap.mean<=$MAX_ORACLE_GAP")
fi

status=0
"$GIF" remove-samples "$CONFIG" "${overrides[@]}" "output.dir=$OUT_DIR" --force "${gates[@]}" \
  || status=$?
case $status in
  0|3) echo "artefacts: $OUT_DIR (report.md, report.json, model.safetensors)" ;;
esac
exit "$status"
