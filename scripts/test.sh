#!/usr/bin/env bash
# The one test command for people and CI: install into .venv (created if missing), lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# setuptools' build warnings (editable install of a flat layout) are noise to a user: silenced
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --upgrade pip
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
# one worker per core (pytest-xdist); the trained fixtures are shared, trained once
.venv/bin/python -m pytest -n auto "$@"
