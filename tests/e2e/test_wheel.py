"""A wheel install (not editable, not run from the checkout) starts the embedded stack on Apache
Kafka from the files inside the package, the CLI and topic declarations work from it, and the demo
runs from it with the reference systems the wheel carries."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson
import psutil
import pytest

from dsrflow.testing.brokers import in_ci

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _run(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _jvms(where: Path) -> list[int]:
    """Live Java processes whose command line names ``where``."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if (proc.info["status"] != psutil.STATUS_ZOMBIE and cmd and Path(cmd[0]).name == "java"
                    and any(str(where) in arg for arg in cmd)):
                found.append(int(proc.info["pid"]))
        except psutil.Error:
            continue
    return found


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

    # A cache dir of its own: the wheel resolves the classpath itself (Maven on the pom it ships, with
    # the JAVA_HOME of the java it found), rather than read the one a checkout cached in ~/.cache.
    # The jars themselves stay cached in ~/.m2, so this costs a few seconds.
    cache = tmp_path / "cache"
    state = (tmp_path / "state").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(DSRFLOW_STATE_DIR=str(state), DSRFLOW_CACHE_DIR=str(cache),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    where = _run([str(py), "-c", "import dsrflow.stack.kafka as k, dsrflow.topics as t; "
                  "print(k.POM); print(t.topics_dir())"], env=env, cwd=tmp_path)
    pom, topics_dir = where.stdout.split()
    assert pom.startswith(str(site)) and Path(pom).exists(), where  # from the wheel, not the checkout
    assert topics_dir.startswith(str(site)), where

    dsrflow = str(venv / "bin" / "dsrflow")
    up = _run([dsrflow, "stack", "up"], env=env, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        stack = orjson.loads((state / "stack.json").read_bytes())
        assert stack["broker_kind"] == "apache"
        # the classpath came from Maven run by the wheel, on the pom copied out of the installed package
        maven_log = (cache / "dsrflow" / "kafka" / "maven.log").read_text()
        assert list((cache / "dsrflow" / "kafka").glob("classpath-*.txt")), maven_log
        assert f"-f {cache / 'dsrflow' / 'kafka'}" in maven_log and "(exit status 0)" in maven_log, maven_log
        java_home = maven_log.split("JAVA_HOME=", 1)[1].splitlines()[0]
        assert (Path(java_home) / "bin" / "java").exists(), maven_log
        applied = _run([dsrflow, "topics", "apply"], env=env, cwd=tmp_path)
        assert applied.returncode == 0, applied.stderr[-3000:]
        assert "dsr.requests.v1" in applied.stdout
        kcat = shutil.which("kcat") or shutil.which("kafkacat")  # kafkacat: its name on older distributions
        if kcat is None and in_ci():
            pytest.fail("CI=true: neither kcat nor kafkacat is installed (.ci/run installs kcat)")
        if kcat is not None:
            meta = _run([kcat, "-L", "-b", stack["kafka_bootstrap"], "-t", "dsr.requests.v1"], env=env, cwd=tmp_path,
                        timeout=30)
            assert meta.returncode == 0 and 'topic "dsr.requests.v1"' in meta.stdout, meta.stderr
    finally:
        down = _run([dsrflow, "stack", "down"], env=env, cwd=tmp_path)
        left = _jvms(state)
        for pid in left:  # do not leave a broker behind, whatever failed
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    assert down.returncode == 0, down.stderr[-3000:]
    assert left == [], f"java processes for {state} left after `stack down`: {left}"

    # The reference systems ship inside the package: the demo runs from the wheel alone, outside any
    # checkout (tmp_path has no examples/), its workers too.
    where = _run([str(py), "-c", "from dsrflow._reference import ensure_examples; ensure_examples(); "
                  "import examples.crm.worker as w; print(w.__file__)"], env=env, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where
    try:
        demo = _run([dsrflow, "demo"], env=env, cwd=tmp_path, timeout=600)
        assert demo.returncode == 0, (demo.stdout[-3000:], demo.stderr[-3000:])
        assert "demo succeeded" in demo.stdout and "BAD" not in demo.stdout, demo.stdout[-3000:]
    finally:
        left = _jvms(state)
        for pid in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    assert left == [], f"java processes for {state} left after the demo: {left}"
