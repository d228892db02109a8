#!/usr/bin/env bash
# Creates .venv beside this file and installs requirements.txt into it, then the repository itself
# (editable, no dependencies) so submitit finds kdbench's PBS plugin through its entry points.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
