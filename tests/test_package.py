"""The sdist is complete: what `pip install skipdit_fast-<v>.tar.gz` needs to build and
run (native sources, the build description, the tools the build calls, weights,
kernels as real files, license, py.typed) and no build output. Built here with
setuptools' own PEP 517 hook (what `python -m build --sdist` calls), in a subprocess
in the source tree. `make package-check` installs such an sdist into a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("sdist")
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_sdist(sys.argv[1]))", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    name = r.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        members = tar.getmembers()
    top = members[0].name.split("/")[0]
    return {m.name[len(top) + 1:]: m for m in members if m.name != top}


def tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_sdist_has_what_the_build_needs(sdist):
    for f in ["CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "README.md", "tools/ptxas_log.sh",
              "tools/join_ptxas_logs.cmake", "skipdit_fast/py.typed"]:
        assert f in sdist, f
    for f in tracked("csrc"):
        assert f in sdist, f
    # the tools CMakeLists.txt calls are in the sdist
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    for f in tracked("tools"):
        if os.path.basename(f) in cmake:
            assert f in sdist, f


def test_sdist_has_weights_and_kernels_as_files(sdist):
    for f in tracked("skipdit_fast/weights"):
        assert f in sdist and sdist[f].isfile(), f
    for f in tracked("kernels"):
        if f.endswith(".py"):
            member = sdist.get("skipdit_fast/" + f)
            assert member is not None and member.isfile(), f  # the symlink's target, as real files
    for f in tracked("skipdit_fast"):
        if f.endswith(".py"):
            assert f in sdist, f


def test_sdist_has_no_build_output(sdist):
    bad = [f for f in sdist if f.endswith((".so", ".o", ".pyc")) or f.startswith(("build/", "dist/"))
           or f.endswith("_C.ptxas.txt") or "__pycache__" in f]
    assert not bad, bad
