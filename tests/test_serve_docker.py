"""The Docker image's recipe without a Docker engine: the files the Dockerfile copies, its install script
run in a fresh virtual environment, and its entrypoint and health check started against a real model.

The venv sees the test environment's site-packages through a ``.pth`` file and pip runs with ``--no-index``:
the dependencies (torch included) come from the environment running the tests, nothing is downloaded, and
only InsightAD itself is built and installed from the copied files, so the test takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY instruction (once: the runtime and full stages copy the same files)."""
    out: list[tuple[list[str], str]] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            if (parts[:-1], parts[-1]) not in out:
                out.append((parts[:-1], parts[-1]))
    return out


def copy_like_docker(workdir: Path) -> None:
    """Apply the Dockerfile's COPY instructions with relative destinations under ``workdir``."""
    for sources, dest in dockerfile_copies():
        if dest.startswith("/"):
            continue
        target = workdir / dest
        for src in sources:
            path = ROOT / src
            to = target / path.name if (dest.endswith("/") or len(sources) > 1) else target
            to.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, to, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(path, to)


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)  # never runs as root
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", text, re.M)
    assert "INSIGHTAD_HOST=0.0.0.0" in text and "EXPOSE 8080" in text
    assert re.search(r"^ARG TORCH_VARIANT=default", text, re.M) and "TORCH_VARIANT=cpu" in text
    assert 'ENTRYPOINT ["sh", "/opt/insightad/docker/entrypoint.sh"]' in text
    copied = {s for sources, _ in dockerfile_copies() for s in sources}
    assert {"pyproject.toml", "constraints.txt", "src", "docker/install.sh", "docker/entrypoint.sh",
            "docker/healthcheck.py", "docker/models/"} <= copied
    assert "-c \"$constraints\"" in (ROOT / "docker/install.sh").read_text()  # pinned installs


def _env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1",
               INSIGHTAD_OFFLINE="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_install_script_pip_commands(tmp_path):
    """The exact pip commands of each TORCH_VARIANT, recorded by a stand-in interpreter."""
    app = tmp_path / "app"
    copy_like_docker(app)
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    script = str(app / "docker/install.sh")
    cons = f"{app}/constraints.txt"
    for variant, extras, expected in [
        ("default", None, [f"-m pip install -c {cons} --quiet {app}[train]"]),
        ("cpu", None, [f"-m pip install -c {cons} --index-url https://download.pytorch.org/whl/cpu --quiet torch "
                       "torchvision", f"-m pip install -c {cons} --quiet {app}[train]"]),
        ("default", "", [f"-m pip install -c {cons} --quiet {app}"]),  # the runtime image: no PyTorch
    ]:
        log.unlink(missing_ok=True)
        env = _env(tmp_path, PYTHON=str(stub), TORCH_VARIANT=variant, **({} if extras is None else {"INSIGHTAD_EXTRAS": extras}))
        done = subprocess.run(["sh", script, str(app), "--quiet"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines()[:-1] == expected
    bad = subprocess.run(["sh", script, str(app)], env=_env(tmp_path, PYTHON=str(stub), TORCH_VARIANT="gpu"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "TORCH_VARIANT must be 'default' or 'cpu'" in bad.stderr
    bad = subprocess.run(["sh", script, str(tmp_path)], env=_env(tmp_path, PYTHON=str(stub)),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not the InsightAD project" in bad.stderr


def test_install_script_entrypoint_and_healthcheck(tmp_path, baseline_model):
    """The real thing in a fresh venv: install, run the entrypoint, probe it with the health check."""
    app = tmp_path / "opt" / "insightad"
    copy_like_docker(app)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The dependencies (and pip, setuptools) come from the environment running this test, whatever it is (a
    # virtual environment or not): a .pth line adds its site-packages after the new venv's own.
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "outer-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run(["sh", str(app / "docker/install.sh"), str(app), "--no-index", "--no-build-isolation",
                           "--quiet"], env=_env(venv, PYTHON=str(py)), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed insightad " in done.stdout
    where = subprocess.run([str(py), "-c", "import insightad; print(insightad.__file__)"], env=_env(venv),
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed copy runs, not the source tree
    assert (venv / "bin" / "insightad").exists()

    entry, health = app / "docker/entrypoint.sh", app / "docker/healthcheck.py"
    missing = subprocess.run(["sh", str(entry)], env=_env(venv, INSIGHTAD_MODEL=str(tmp_path / "none.safetensors")),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no model file at" in missing.stderr

    port = str(_free_port())
    env = _env(venv, INSIGHTAD_MODEL=str(baseline_model), INSIGHTAD_HOST="127.0.0.1", INSIGHTAD_PORT=port,
               INSIGHTAD_API_KEY="from-env")
    assert subprocess.run([str(py), str(health)], env=env, capture_output=True, timeout=30).returncode == 1
    server = subprocess.Popen(["sh", str(entry), "--no-access-log"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # import, model load and ONNX export on a busy 2-core machine
        while subprocess.run([str(py), str(health)], env=env, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.3)
        # the key comes from the environment (docker run -e): /model needs it, /health does not
        url = f"http://127.0.0.1:{port}/model"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": "from-env"}), timeout=10) as r:
            assert json.load(r)["method"] == "baseline"
        for path in ("/", "/assets/app.js", "/assets/style.css"):  # the web page ships in the installed package
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200 and r.read()
    finally:
        server.terminate()
        server.wait(30)
    assert f"on http://127.0.0.1:{port}" in server.stderr.read()
