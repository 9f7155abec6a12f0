#!/usr/bin/env bash
# Runs the demo on the default model; sets up .venv first if needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/loramux" demo "$@"
