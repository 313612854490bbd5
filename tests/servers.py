"""A real `mlflow server` for tests: loopback only, a free port, its own folder, always stopped.

`running_server(folder)` starts `python -m mlflow server` on 127.0.0.1 with a SQLite backend in `folder`
and `--serve-artifacts` into `folder/artifacts`, so a client needs nothing but HTTP. It waits for
`/health` with a deadline, and stops the server's whole process group on exit (uvicorn runs as a child
of `mlflow server`, so stopping only the parent would leave the port taken).

It is also a pytest plugin (`pytest_plugins = ["tests.servers"]` in a test module; take what you need
from its fixtures rather than importing this module, which would keep pytest from rewriting its
asserts). Fixtures, each started once per session and only when a test asks for it:
  served_sweep   a server holding one tiny strategic sweep logged through the CLI, shared by the
                 remote-tracking and UI tests instead of training it twice
  auth_server    `mlflow server --app-name basic-auth` with one ordinary user (skips without Flask-WTF)
  unused_port    a loopback port nothing listens on
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # about 12 s on 2 cores; generous for a loaded CI machine
STOP_TIMEOUT_S = 15.0
# What the shared sweep trains: the strategic preset at the suite's tiny sizes.
TINY = ["--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64"]
SWEEP_EXPERIMENT = "remote"
# MLflow's client retries a failing request 7 times with backoff (minutes); a broken test server
# should fail a test in seconds instead.
BOUNDED_RETRIES = "2"


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    folder: Path
    artifacts: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def answers_health(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:  # noqa: S310 (loopback)
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_group(pid: int, signal_number: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, signal_number)


def _exited(pid: int) -> bool:
    """Whether our child `pid` has exited, without reaping it (WNOWAIT): until it is reaped its pid, and
    so its process group id, cannot be given to another process."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left of it, then reap the parent."""
    if process.returncode is not None:
        return  # it exited by itself and was reaped: its group id is no longer ours to signal
    _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not _exited(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait(timeout=10.0)


@contextmanager
def running_server(
    folder: Path,
    *,
    app_name: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[MlflowServer]:
    """Start `mlflow server` with its database, artifacts and log in `folder`; stop it on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = folder / "artifacts"
    log = folder / "server.log"
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if app_name is not None:
        command += ["--app-name", app_name]
    server_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_TRACKING_", "MLFLOW_EXPERIMENT_", "MLFLOW_RUN_ID"))
    }
    # The job runner (huey consumers, about ten processes) serves GenAI features these tests never use
    # and doubles the start-up time on 2 cores.
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_env.update(env or {})
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=folder,  # anything the server writes relative to its cwd stays in `folder`
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so _stop reaches uvicorn too
        )
    server = MlflowServer(f"http://{HOST}:{port}", folder, artifacts, log, process)
    try:
        deadline = time.monotonic() + timeout
        while not answers_health(server.uri):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server gave no /health within {timeout:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        yield server
    finally:
        _stop(process)


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def post_json(url: str, payload: dict, headers: dict[str, str], timeout: float = 30.0) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
        return json.loads(response.read() or b"{}")


@dataclass(frozen=True)
class ServedSweep:
    server: MlflowServer
    experiment: str
    client_folder: Path  # the working directory the sweep ran in
    output: str


@pytest.fixture(scope="session")
def served_sweep(tmp_path_factory) -> Iterator[ServedSweep]:
    """One server for the session with one tiny strategic sweep, logged by `cli.py sweep` over HTTP.

    The sweep runs from an empty working directory of its own, so a test can check that the client
    wrote nothing locally: runs and artifacts went to the server's folder.
    """
    from click.testing import CliRunner

    import cli

    with running_server(tmp_path_factory.mktemp("server")) as server:
        client_folder = tmp_path_factory.mktemp("client")
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(client_folder)
            for name in (
                "MLFLOW_TRACKING_URI",
                "MLFLOW_RUN_ID",
                "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME",
            ):
                patch.delenv(name, raising=False)
            patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", BOUNDED_RETRIES)
            result = CliRunner().invoke(
                cli.cli,
                [
                    "sweep",
                    "--preset",
                    "strategic",
                    *TINY,
                    "--tracking-uri",
                    server.uri,
                    "--experiment",
                    SWEEP_EXPERIMENT,
                ],
            )
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}\n{server.log_tail()}"
        yield ServedSweep(server, SWEEP_EXPERIMENT, client_folder, result.output)


@dataclass(frozen=True)
class AuthServer:
    server: MlflowServer
    admin_password: str
    username: str
    password: str


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    """`mlflow server --app-name basic-auth` with an admin and one ordinary user, random passwords."""
    pytest.importorskip(
        "flask_wtf",
        reason="`mlflow server --app-name basic-auth` needs Flask-WTF: pip install 'mlflow[auth]'",
    )
    folder = tmp_path_factory.mktemp("auth-server")
    admin_password = secrets.token_urlsafe(16)
    config = folder / "basic_auth.ini"
    # MLflow's default config keeps the user database in the server's cwd: name it explicitly. The
    # credential cache spares a password hash (about 0.1 s) on every request.
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # read once, to create the admin user
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    with running_server(folder, app_name="basic-auth", env=env) as server:
        username, password = f"researcher-{secrets.token_hex(4)}", secrets.token_urlsafe(18)
        post_json(
            f"{server.uri}/api/2.0/mlflow/users/create",
            {"username": username, "password": password},
            basic_auth_header("admin", admin_password),
        )
        yield AuthServer(server, admin_password, username, password)


@pytest.fixture
def unused_port() -> int:
    return free_port()
