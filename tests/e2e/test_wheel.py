"""A wheel install (not editable, not run from the checkout) starts the embedded stack on Apache
Kafka from the files inside the package, and the CLI and topic declarations work from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson
import pytest

from dsrflow.testing.brokers import in_ci

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _run(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_a_wheel_install_runs_the_stack_and_the_cli(tmp_path: Path) -> None:
    from dsrflow.stack.kafka import available

    why = available()
    if why is not None:
        if in_ci():
            pytest.fail(f"CI=true: Apache Kafka cannot start here: {why}")
        pytest.skip(why)
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                  str(ROOT)], env=dict(os.environ), cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("dsrflow-*.whl")

    # A fresh environment with the wheel alone; its dependencies come from this environment's
    # site-packages, added as a plain path (so the checkout's editable install is not seen).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=dict(os.environ), cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=dict(os.environ), cwd=tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                      str(wheel)], env=dict(os.environ), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(DSRFLOW_STATE_DIR=str(tmp_path / "state"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    where = _run([str(py), "-c", "import dsrflow.stack.kafka as k, dsrflow.topics as t; "
                  "print(k.POM); print(t.topics_dir())"], env=env, cwd=tmp_path)
    pom, topics_dir = where.stdout.split()
    assert pom.startswith(str(site)) and Path(pom).exists(), where  # from the wheel, not the checkout
    assert topics_dir.startswith(str(site)), where

    dsrflow = str(venv / "bin" / "dsrflow")
    up = _run([dsrflow, "stack", "up"], env=env, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        stack = orjson.loads((tmp_path / "state" / "stack.json").read_bytes())
        assert stack["broker_kind"] == "apache"
        applied = _run([dsrflow, "topics", "apply"], env=env, cwd=tmp_path)
        assert applied.returncode == 0, applied.stderr[-3000:]
        assert "dsr.requests.v1" in applied.stdout
        kcat = shutil.which("kcat")
        if kcat is None and in_ci():
            pytest.fail("CI=true: kcat is not installed (.ci/run installs it)")
        if kcat is not None:
            meta = _run([kcat, "-L", "-b", stack["kafka_bootstrap"], "-t", "dsr.requests.v1"], env=env, cwd=tmp_path,
                        timeout=30)
            assert meta.returncode == 0 and 'topic "dsr.requests.v1"' in meta.stdout, meta.stderr
    finally:
        down = _run([dsrflow, "stack", "down"], env=env, cwd=tmp_path)
    assert down.returncode == 0, down.stderr[-3000:]
