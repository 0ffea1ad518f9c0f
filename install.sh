#!/usr/bin/env bash
# Set up IdleClaw in ./.venv. Safe to run again; needs no root. `bash install.sh --help` says how.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
Usage: bash install.sh [--dev | --scripts | --help]

Installs into ./.venv (created with $PYTHON, default python3). Safe to run again; needs no root.

  (no option)  the router: requirements.txt, then migrates the embedded SQLite database
  --dev        the router and the test requirements (requirements-dev.txt), as CI does
  --scripts    only the skill scripts (contribute.py, consume.py, status.py) and what they
               need: requests and websocket-client (skill_scripts/requirements.txt); no
               Django, no database
  --help       this text
EOF
}

mode=router
case "$#:${1:-}" in
  0:) ;;
  1:--dev) mode=dev ;;
  1:--scripts) mode=scripts ;;
  1:--help | 1:-h) usage; exit 0 ;;
  *)
    echo "install.sh: unknown option: $*" >&2
    usage >&2
    exit 2
    ;;
esac

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "install.sh: $python not found; install Python 3.11 or newer (or set PYTHON)" >&2
  exit 1
fi
# The router needs 3.11; the scripts run on 3.10.
minimum=11
if [ "$mode" = scripts ]; then minimum=10; fi
if ! "$python" -c "import sys; sys.exit(sys.version_info < (3, $minimum))"; then
  echo "install.sh: $("$python" --version 2>&1) is too old; Python 3.$minimum or newer is needed" >&2
  exit 1
fi

# Two packages need no pip inside the venv: without one it is created in a fraction of the time
# (no ensurepip) and space, and python3's own pip fills it (pip 22.3 or newer: --python).
if [ "$mode" = scripts ] && [ ! -e .venv ] \
  && "$python" -m pip --help 2>/dev/null | grep -- '--python <python>' >/dev/null; then
  "$python" -m venv --without-pip .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if .venv/bin/python -m pip --version >/dev/null 2>&1; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
else
  pip=("$python" -m pip --python .venv/bin/python install --quiet --disable-pip-version-check)
fi

if [ "$mode" = scripts ]; then
  "${pip[@]}" -r skill_scripts/requirements.txt
  echo "IdleClaw skill scripts installed in $(pwd)/.venv (requests and websocket-client only)"
  if ! command -v ollama >/dev/null 2>&1; then
    echo "warning: ollama is not on PATH: contribute.py needs a running Ollama" \
      "(https://ollama.com); consume.py and status.py do not" >&2
  fi
  cat <<EOF

Next steps (IDLECLAW_SERVER is the router; without it, the public network):
  export IDLECLAW_SERVER=http://router.example:8000
  .venv/bin/python skill_scripts/status.py                  # nodes and models on offer
  .venv/bin/python skill_scripts/consume.py --model llama3.2:3b --prompt "Why is the sky blue?"
  .venv/bin/python skill_scripts/consume.py --model llama3.2:3b -i     # chat
  .venv/bin/python skill_scripts/contribute.py              # share your Ollama (Ctrl+C stops)
skill_scripts/SKILL.md describes each mode, what it sends where, and its options.
EOF
  exit 0
fi

"${pip[@]}" --upgrade pip
req=requirements.txt
if [ "$mode" = dev ]; then
  req=requirements-dev.txt
fi
"${pip[@]}" -r "$req"
.venv/bin/python manage.py migrate --noinput >/dev/null
echo "IdleClaw installed in $(pwd)/.venv"
