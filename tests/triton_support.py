"""A real Triton Inference Server for the tests, from PyPI's nvidia-pytriton (it bundles the tritonserver binary).

PyTriton pins numpy < 2, so it lives in a venv of its own, made on first use under `.cache/pytriton-venv`
(ignored by git) with pip's progress shown, and reused by later runs. The server runs as a real subprocess
(tests/triton_server.py) on loopback ports; the python-backend stub that PyTriton's model runs in links
libpython dynamically, so LD_LIBRARY_PATH gets the venv's Python library directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections import deque
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.ports import free_port

VENV = REPO_ROOT / ".cache" / "pytriton-venv"
REQUIREMENTS = ("nvidia-pytriton==0.7.0", "onnxruntime")
READY_MARKER = VENV / ".edgenode-ready"
SERVER_SCRIPT = REPO_ROOT / "tests" / "triton_server.py"
_venv_lock = threading.Lock()


def _progress(text: str) -> None:
    """Shown even under pytest's capture: making the venv takes a minute or two the first time."""
    print(f"[pytriton venv] {text}", file=sys.__stderr__, flush=True)


def pytriton_python() -> Path:
    """The PyTriton venv's python, making the venv first if needed; skips the test if pip cannot install it."""
    python = VENV / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS)
    with _venv_lock:
        if READY_MARKER.is_file() and READY_MARKER.read_text() == wanted and python.is_file():
            return python
        _progress(f"creating {VENV} with {', '.join(REQUIREMENTS)} (once; reused by later runs)")
        shutil.rmtree(VENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        tail: deque[str] = deque(maxlen=30)
        proc = subprocess.Popen(
            [str(python), "-m", "pip", "install", "--progress-bar", "off", *REQUIREMENTS],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith(("Collecting", "Installing", "Successfully")):
                _progress(line.rstrip()[:160])
        if proc.wait() != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip("the nvidia-pytriton wheel cannot be installed here:\n" + "\n".join(tail))
        READY_MARKER.write_text(wanted)
        _progress("ready")
        return python


def python_libdir(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def server_env(python: Path, extra_paths: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    libs = [python_libdir(python), *(extra_paths or [])]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env.pop("PYTHONPATH", None)  # the server venv must not see the project's packages
    return env


class TritonProcess:
    """One server process; `start()` waits for its model to be served, `stop()` ends it (and tritonserver)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, grpc_port: int) -> None:
        self.command, self.env, self.log_path, self.grpc_port = command, env, log_path, grpc_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, ready: str = "READY", timeout: float = 180.0) -> None:
        log = self.log_path.open("ab")
        offset = log.tell()  # a restart appends: only what this start writes counts
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in self.log_path.read_bytes()[offset:].decode(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-4000:]
        self.stop()
        raise RuntimeError(f"Triton did not become ready ({' '.join(self.command[:3])} ...):\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group this test started (the script and its tritonserver child)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # tritonserver may outlive the script a moment: ours too
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        wait_port_free(self.grpc_port)


def wait_port_free(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)


def pytriton_server(
    python: Path,
    onnx_path: Path,
    model_name: str,
    parameters: dict[str, str],
    log_path: Path,
    max_batch: int = 28,
    tls: tuple[Path, Path, Path] | None = None,
) -> TritonProcess:
    """tests/triton_server.py serving `onnx_path` (not started yet); `tls`: (certificate, key, CA of the client
    certificates it requires)."""
    grpc_port = free_port()
    command = [
        str(python),
        str(SERVER_SCRIPT),
        "--onnx", str(onnx_path),
        "--model-name", model_name,
        "--grpc-port", str(grpc_port),
        "--http-port", str(free_port()),
        "--metrics-port", str(free_port()),
        "--max-batch", str(max_batch),
    ]  # fmt: skip
    for key, value in parameters.items():
        command += ["--parameter", f"{key}={value}"]
    if tls is not None:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]), "--tls-ca", str(tls[2])]
    return TritonProcess(command, server_env(python), log_path, grpc_port)


def tritonserver_dir(python: Path) -> Path:
    """The tritonserver tree inside the PyTriton wheel (bin/, backends/, python_backend_stubs/)."""
    out = subprocess.run(
        [str(python), "-c", "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def bundled_backends(python: Path) -> list[str]:
    return sorted(p.name for p in (tritonserver_dir(python) / "backends").iterdir() if p.is_dir())


def raw_tritonserver(python: Path, repository: Path, work: Path, log_path: Path) -> TritonProcess:
    """The bundled tritonserver binary itself on a model repository (not started yet).

    Its python backend needs the stub built for the venv's Python next to it (PyTriton does the same in
    its own workspace), and the venv's packages on the stub's path.
    """
    server = tritonserver_dir(python)
    version = subprocess.run(
        [str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    backends = work / "backends"
    shutil.copytree(server / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    site = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    grpc_port = free_port()
    command = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--grpc-port={grpc_port}",
        "--grpc-address=127.0.0.1",
        f"--http-port={free_port()}",
        "--http-address=127.0.0.1",
        f"--metrics-port={free_port()}",
        "--allow-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
    ]
    env = server_env(python, [str(server / "external_libs"), str(server.parent.parent / "nvidia_pytriton.libs")])
    env["PYTHONPATH"] = site
    env["PATH"] = f"{python.parent}:{env['PATH']}"  # as PyTriton runs it: the stub's Python is the venv's
    return TritonProcess(command, env, log_path, grpc_port)
