"""Packaging: the repository root installs as ONE top-level package, `vdistill`.

The root folders kernels/, models/, methods/, bench/ install as vdistill.kernels, ... (pyproject:
package-dir {"vdistill" = "."} and an explicit package list). Bare top-level names collided with real
distributions: transformers >= 5 depends on the PyPI package `kernels`, and with the checkout first on
sys.path diffusers' Wan import failed. These tests pin the wheel's contents, the import resolution from the
repository root, and the installed distribution's names.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("kernels", "models", "methods", "bench")
TEACHER = "models/weights/shapes-teacher/model.safetensors"
# Build outputs and local state that never belong in a wheel (and may be large: runs/ holds training runs).
_ROOT_IGNORE = {".git", "build", "dist", "runs", ".venv", "venv", ".benchmarks"}


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (n.startswith(".") and n.endswith("_cache"))}
    if Path(folder).resolve() == ROOT:
        skip |= _ROOT_IGNORE & set(names)
    return skip


def _env() -> dict[str, str]:
    """The subprocess environment: no PYTHONPATH, so only the installation and the working directory count."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSAFEPATH", None)  # `python -c` must put the working directory first
    return env


def _python_json(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter in `cwd` (`-c` puts cwd first on sys.path); its last printed line as JSON."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the checkout's wheel (offline: no build isolation, no index) from a copy, so the build never writes
    build/ or *.egg-info into the checkout; returns the wheel's path."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools in this environment (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=_copy_ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("vdistill-*.whl"))
    assert len(wheels) == 1, f"expected one vdistill wheel, got {sorted(p.name for p in out.iterdir())}"
    return wheels[0]


def _checkout_modules() -> list[str]:
    """Every .py file of the package folders, as the wheel names it (vdistill/<folder>/...)."""
    found = []
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "__pycache__" in rel.parts or "tests" in rel.parts:
                continue
            found.append("vdistill/" + rel.as_posix())
    return sorted(found)


@pytest.mark.slow
def test_wheel_has_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {name.split("/", 1)[0] for name in names}
        dist_info = {t for t in tops if t.endswith(".dist-info")}
        assert len(dist_info) == 1, tops
        assert tops - dist_info == {"vdistill"}, f"the wheel installs top-level names other than vdistill: {tops}"
        top_level = f"{dist_info.pop()}/top_level.txt"
        if top_level in names:  # setuptools writes it; importlib.metadata and pip read it
            assert zf.read(top_level).decode().split() == ["vdistill"]


@pytest.mark.slow
def test_wheel_ships_every_module_and_the_teacher(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    modules = _checkout_modules()
    assert len(modules) > 20, modules  # the folders were found at all
    missing = [m for m in modules if m not in names]
    assert not missing, ("modules in the checkout but not in the wheel (add their package to "
                         f"[tool.setuptools] packages in pyproject.toml): {missing}")
    for data in (TEACHER, "models/weights/shapes-teacher/config.json"):
        assert (ROOT / data).is_file(), f"the checkout lacks {data}"
        assert "vdistill/" + data in names, f"the wheel lacks the shipped teacher file vdistill/{data}"


def test_checkout_on_sys_path_does_not_shadow_pypi_kernels():
    """From the repository root with `python -c` (cwd first on sys.path), `import kernels` is transformers'
    dependency, not the checkout's kernels/ folder, and vdistill's own kernels import in the same process."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` (a transformers >= 5 dependency) is not installed")
    code = (
        "import json, sys\n"
        "assert sys.path[0] in ('', '.'), sys.path[:2]\n"
        "import kernels\n"
        "import vdistill.kernels.attention as att\n"
        "print(json.dumps({'kernels': kernels.__file__, 'get_kernel': hasattr(kernels, 'get_kernel'),\n"
        "                  'attention': callable(att.attention), 'att_file': att.__file__}))\n"
    )
    got = _python_json(code, cwd=ROOT)
    # a namespace package made of the checkout's folder has no __file__
    assert got["kernels"] is not None, "`import kernels` resolved to the checkout's kernels/ folder (a namespace)"
    kernels_file = Path(got["kernels"]).resolve()
    assert kernels_file == Path(dist.locate_file("kernels/__init__.py")).resolve(), (
        f"`import kernels` from the repository root resolved to {kernels_file}, not the PyPI distribution")
    assert got["get_kernel"], "the PyPI kernels package lacks get_kernel: something else is named kernels"
    assert got["attention"]
    assert Path(got["att_file"]).name == "__init__.py"


def test_installed_distribution_names_only_vdistill(tmp_path):
    """The installed vdistill (wheel or editable) declares and exposes one top-level name."""
    # Not the checkout's own vdistill.egg-info (left by editable builds): with the root on sys.path ('' under
    # `python -m pytest`), importlib.metadata.distribution("vdistill") would find that one first.
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    dist = next(iter(importlib.metadata.distributions(name="vdistill", path=path)), None)
    if dist is None:
        pytest.skip("vdistill is not installed (pip install -e '.[dev]')")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert set(top_level.split()) == {"vdistill"}, top_level
    # RECORD: an editable install adds only setuptools' __editable__ finder and .pth next to vdistill
    offenders = []
    for f in dist.files or []:
        top = f.parts[0]
        if top in ("..", "__pycache__") or top.endswith(".dist-info") or top.startswith("__editable__"):
            continue
        if top != "vdistill":
            offenders.append(str(f))
    assert not offenders, f"the installed vdistill ships top-level names other than vdistill: {offenders}"
    # what actually matters: from a neutral directory, the bare names are not importable from vdistill
    code = (
        "import importlib.util, json\n"
        "names = ('models', 'methods', 'bench', 'kernels')\n"
        "specs = {n: importlib.util.find_spec(n) for n in names}\n"
        "print(json.dumps({n: (None if s is None else [s.origin, list(s.submodule_search_locations or [])])\n"
        "                  for n, s in specs.items()}))\n"
    )
    specs = _python_json(code, cwd=tmp_path)
    for name, spec in specs.items():
        if spec is None:
            continue
        origin, locations = spec
        paths = [Path(p).resolve() for p in ([origin] if origin else []) + locations]
        assert not any(p == ROOT / name or ROOT / name in p.parents for p in paths), (
            f"`import {name}` resolves into the checkout from outside it: {paths}")
