"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


SERVER_URL = "http://127.0.0.1:8000/v1"


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_example_runs(index, tmp_path):
    """Each example runs as written; one that talks to a server gets the README's `loramux serve`."""
    code = _python_blocks()[index]
    server = None
    if SERVER_URL in code:
        from test_server import Server

        server = Server(tmp_path / "data", "--api-key", "secret", port=8000)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    finally:
        if server is not None:
            server.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "the example printed nothing"


def test_cli_options_in_readme_exist():
    from loramux.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices.values()
    known = {opt for sub in commands for action in sub._actions for opt in action.option_strings}
    documented = set(re.findall(r"`(--[a-z-]+)", README.read_text()))
    assert documented and documented <= known, documented - known
