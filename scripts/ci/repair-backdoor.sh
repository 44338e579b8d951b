#!/usr/bin/env bash
# CI gate: repair a backdoored model from its known poisoned samples (or its known trigger), and
# fail the build when the backdoor still works or clean accuracy suffered. Adapt the settings
# below, or set them in the CI job's environment; extra arguments are KEY=VALUE config
# overrides passed to every gif command, e.g.
#
#   CONFIG=configs/my-model.yaml scripts/ci/repair-backdoor.sh removal.poison_indices=poisoned.txt
#
# The base checkpoint (trained on the poisoned data) is reused when it exists, else trained.
# Everything the repair writes stays in OUT_DIR: keep it as a build artefact.
#
# Exit codes (gif's own): 0 every gate holds; 1 an input or run problem; 2 a usage error;
# 3 the repair ran and its outputs are in OUT_DIR, but a gate failed.
set -euo pipefail

# gif from the project's .venv when run from a clone, else from PATH (or set GIF=...)
if [ -z "${GIF:-}" ]; then
  here=$(cd "$(dirname "$0")/../.." && pwd)
  if [ -x "$here/.venv/bin/gif" ]; then GIF="$here/.venv/bin/gif"; else GIF=gif; fi
fi
CONFIG=${CONFIG:-configs/digits-backdoor.yaml}
BASE=${BASE:-runs/ci/backdoor-base.safetensors}  # backdoored model: reused, or trained here
OUT_DIR=${OUT_DIR:-runs/ci/recover-backdoor}

# The gates, in percent of the test split (see "Using gif in CI" in the README).
MAX_ASR=${MAX_ASR:-5}                           # triggered inputs still sent to the target
MAX_CLEAN_DROP=${MAX_CLEAN_DROP:-2}             # clean accuracy lost at most
MAX_PARAMS_FRACTION=${MAX_PARAMS_FRACTION:-0.05}  # share of parameters changed at most

overrides=("checkpoint=$BASE" "$@")

if [ -f "$BASE" ]; then
  echo "reusing base checkpoint $BASE"
else
  "$GIF" train "$CONFIG" "${overrides[@]}" -o "$BASE"
fi

status=0
"$GIF" recover-backdoor "$CONFIG" "${overrides[@]}" "output.dir=$OUT_DIR" --force \
  --check "after.asr_test<=$MAX_ASR" \
  --check "after.clean_acc_test>=before.clean_acc_test-$MAX_CLEAN_DROP" \
  --check "params.fraction<=$MAX_PARAMS_FRACTION" \
  || status=$?
case $status in
  0|3) echo "artefacts: $OUT_DIR (report.md, report.json, model.safetensors)" ;;
esac
exit "$status"
