"""What `pip install` gets from this tree: the wheel's Python packages and the sdist's
sources. An editable install (CI's, and most developers') imports from the tree itself,
so neither can go wrong there unnoticed: a subpackage missing from the packages list,
or a header missing from the sdist, only breaks a user's non-editable install.

Runs setup.py's own commands (no compiler: build_py copies, sdist packs), with the
egg-info written outside the tree and MOBILENET_EXT_CUDA=0, so the sdist is shown not to
depend on the machine that makes it."""
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = {".h", ".cpp", ".cu", ".cuh"}


def _setup(tmp_path, *commands):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    env = dict(os.environ, MOBILENET_EXT_CUDA="0")
    egg = tmp_path / "egg"
    egg.mkdir()
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg),
                          *commands], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _tree(sub, suffixes):
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / sub).rglob("*")
            if p.suffix in suffixes and "__pycache__" not in p.parts}


def test_wheel_has_every_package(tmp_path):
    lib = tmp_path / "lib"
    _setup(tmp_path, "build_py", "--build-lib", str(lib))
    got = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    want = _tree("mobilenet_ext", {".py"}) | _tree("bench", {".py"})
    assert "mobilenet_ext/triton/dw.py" in want
    assert want <= got, f"missing from the wheel: {sorted(want - got)}"
    assert got <= want, f"not Python sources of the packages: {sorted(got - want)}"


def test_sdist_has_every_source(tmp_path):
    dist = tmp_path / "dist"
    _setup(tmp_path, "sdist", "--dist-dir", str(dist))
    (tarball,) = dist.glob("mobilenet_ext-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = (_tree("csrc", SOURCES) | _tree("mobilenet_ext", {".py"}) | _tree("bench", {".py"})
            | _tree("tests", {".py"}) | {"setup.py", "pyproject.toml", "README.md", "LICENSE",
                                         "MANIFEST.in", "bench/gpu_check.sh"})
    assert any(n.endswith(".cu") for n in want) and "csrc/cuda/vec_tile.cuh" in want
    assert want <= names, f"missing from the sdist: {sorted(want - names)}"
    built = [n for n in names if n.endswith((".so", ".o", ".pyc", ".pyd"))]
    assert not built, f"build products in the sdist: {built}"
