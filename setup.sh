#!/usr/bin/env bash
# Creates .venv beside this file and installs requirements.txt into it. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
