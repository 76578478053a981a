#!/usr/bin/env bash
# Install what is needed, then run wsnic with a profile (default: profiles/default.yaml).
# Extra arguments go to `wsnic apply`, e.g.: scripts/run.sh profiles/lab.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
if [ $# -eq 0 ]; then set -- profiles/default.yaml; fi
exec .venv/bin/wsnic apply "$@"
