#!/usr/bin/env bash
# Install what is needed, then lint, type-check and run the whole test suite (as root:
# the kernel tests build throwaway network namespaces named wsnt-*).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
.venv/bin/ruff check .
.venv/bin/mypy wsnic
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
