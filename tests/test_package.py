"""The package as it ships: `python -m build` on a fresh clone gives an sdist and, built from
it, a wheel; the wheel carries the unit, the LICENSE and the command, installs into a fresh
virtual environment, and runs from there (`--version`, and `install`, which needs the
package's data). The environment reuses this interpreter's numpy, rich, ... (system site
packages, pip told not to reach any index), so only the build itself downloads (setuptools,
into build's isolated environment, from pip's cache). About 10 s here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fresh_clone(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_the_built_wheel_installs_and_runs(tmp_path):
    try:
        import build  # noqa: F401 - the test extra's
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the build module is missing: pip install -e '.[test]'")
        pytest.skip("the build module is not installed (pip install -e '.[test]')")
    tree = fresh_clone(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist")],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from hugepaged import __version__

    wheel = tmp_path / "dist" / f"hugepaged-{__version__}-py3-none-any.whl"
    assert wheel.is_file() and (tmp_path / "dist" / f"hugepaged-{__version__}.tar.gz").is_file()
    names = zipfile.ZipFile(wheel).namelist()
    assert "hugepaged/data/hugepaged.service" in names
    info = f"hugepaged-{__version__}.dist-info"
    assert any(n.startswith(info) and n.endswith("LICENSE") for n in names), names
    entry = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "hugepaged = hugepaged.cli:main" in entry

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", str(wheel)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = env_dir / "bin" / "hugepaged"
    r = subprocess.run([str(py), "-c", "import hugepaged; print(hugepaged.__file__)"], env=env,
                       capture_output=True, text=True, cwd="/")
    assert r.stdout.startswith(str(env_dir)), r.stdout  # the wheel's, not this checkout's
    r = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"hugepaged {__version__}\n"), r.stderr
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run([str(exe), "install", "--root", str(root)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    unit = (root / "etc/systemd/system/hugepaged.service").read_text()
    assert f"ExecStart={exe} run\n" in unit
