#!/usr/bin/env bash
# Set up IdleClaw in ./.venv: pinned requirements and the embedded database.
# Usage: bash install.sh [--dev]    (--dev adds the test requirements)
# Safe to run again; needs no root.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
req=requirements.txt
if [ "${1:-}" = "--dev" ]; then
  req=requirements-dev.txt
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
.venv/bin/python manage.py migrate --noinput >/dev/null
echo "IdleClaw installed in $(pwd)/.venv"
