"""Real processes for the cluster tests: Ray nodes started with ``ray start``, an S3 server.

Every process is started in its own session and stopped by process id: the
process group first, then any process that still names this test's own temp
folder on its command line (daemons that Ray started outside the group).
Nothing is ever stopped by name (no ``ray stop``, no ``pkill``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _processes_naming(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_tree(procs: list[subprocess.Popen], marker: str | None) -> None:
    """SIGKILL each started process's group, then every process naming ``marker``, by pid."""
    leftovers = _processes_naming(marker) if marker else []
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for proc in leftovers + (_processes_naming(marker) if marker else []):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if marker:
        psutil.wait_procs(_processes_naming(marker), timeout=15)


@dataclass
class RayCluster:
    """A head and worker nodes on this machine, each a ``ray start --block`` process."""

    temp_dir: str
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = os.path.join(self.temp_dir, f"{name}.log")
        self.logs.append(log)
        with open(log, "w") as out:
            self.procs.append(
                subprocess.Popen(
                    [RAY, "start", "--block", "--disable-usage-stats", *args],
                    env=env or self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def start_head(
        self, num_cpus: float, extra: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--num-cpus={num_cpus:g}",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={free_port()}",
                *(extra or []),
            ],
            env,
        )
        wait_for_port(self.dashboard_port, timeout_s=90)

    def add_node(self, num_cpus: float) -> None:
        # Its own temp dir: two nodes sharing one would share the runtime-env cache, and one
        # node's agent deletes a working dir it thinks unused while the other's job runs in it.
        name = f"node{len(self.procs)}"
        self._start(
            name,
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={num_cpus:g}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={os.path.join(self.temp_dir, name)}",
            ],
        )

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0) -> list[str]:
        """Node ids once ``count`` nodes are alive."""
        code = (
            f"import ray, json; ray.init(address='{self.gcs_address}', logging_level='ERROR');"
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
        )
        deadline = time.monotonic() + timeout_s
        while True:
            out = subprocess.run(
                [sys.executable, "-c", code],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            ids = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
            if len(ids) >= count or time.monotonic() > deadline:
                return ids
            time.sleep(2)

    def stop(self) -> None:
        stop_tree(self.procs, self.temp_dir)


@dataclass
class S3Server:
    """moto's S3-compatible server on 127.0.0.1, started and stopped by this test."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: str) -> None:
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, timeout_s=60)

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree([self.proc], None)


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact store under ``root``),
    started and stopped (by process group id) by the test."""

    root: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> str:
        return os.path.join(self.root, "mlflow.db")

    @property
    def artifacts(self) -> str:
        return os.path.join(self.root, "artifacts")

    def start(self) -> None:
        import urllib.request

        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        with open(os.path.join(self.root, "mlflow.log"), "w") as out:
            self.proc = subprocess.Popen(
                [
                    mlflow,
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.database}",
                    "--artifacts-destination",
                    self.artifacts,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],  # fmt: skip
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, Path(self.root, "mlflow.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree([self.proc], None)


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """These environment variables set for the block, then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: what the tests' S3 clients present to moto (it accepts any)
S3_TEST_KEYS = {
    "AWS_ACCESS_KEY_ID": "k",
    "AWS_SECRET_ACCESS_KEY": "s",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_objects(client, bucket: str) -> Iterator[tuple[str, bytes]]:
    """Every (key, body) in ``bucket``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield obj["Key"], client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()


class Outage:
    """A TCP forwarder on 127.0.0.1 in front of a server, that a test can cut and restore:
    while cut, new connections are refused and open ones are closed (the server behind it,
    and what it stores, stays up)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
