"""The native library (loramux.native): built once into the cache and loaded from it; where it
cannot be built or is turned off, `available()` is False, the PyTorch paths run and the log says
why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loramux import native


def _available_in_a_fresh_process(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n" \
           "from loramux import native; print('available', native.available())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_a_compiler_that_fails_leaves_the_pytorch_path_and_says_why(tmp_path):
    if not native.available():
        pytest.skip("the kernel is unavailable here for another reason")
    run = _available_in_a_fresh_process({"CC": "false", "LORAMUX_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "available False" in run.stdout
    assert "did not compile" in run.stdout
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left to load next time


def test_turned_off_by_the_environment():
    run = _available_in_a_fresh_process({"LORAMUX_NATIVE_KERNELS": "0"})
    assert run.returncode == 0, run.stderr
    assert "available False" in run.stdout and "LORAMUX_NATIVE_KERNELS=0" in run.stdout


@pytest.mark.skipif(not native.available(), reason="the native kernels cannot run on this machine")
def test_built_once_into_the_cache_then_loaded(tmp_path):
    env = {"LORAMUX_CACHE_DIR": str(tmp_path)}
    first = _available_in_a_fresh_process(env)
    assert "available True" in first.stdout, first.stdout + first.stderr
    built = list((tmp_path / "kernels").glob("loramux-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "available True" in _available_in_a_fresh_process(env).stdout
    assert built[0].stat().st_mtime_ns == stamp
