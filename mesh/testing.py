"""Helpers for testing agents and workers against a real NATS server.

- `NatsServer` (re-exported): a real ``nats-server`` on a free loopback port.
- `WorkerProcess`: a ``mesh worker`` in a child process, to stop or kill.
- `eventually`: poll a condition until it holds or a deadline passes.
- `make_agent`: an agent instance outside a worker, for unit tests of its logic.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from mesh.agent import Agent
from mesh.ids import AgentId
from mesh.server import NatsServer

A = TypeVar("A", bound=Agent)

__all__ = ["NatsServer", "WorkerProcess", "eventually", "make_agent"]


def make_agent(cls: type[A], key: str = "test") -> A:
    """An instance of `cls` for ``AgentId(cls.agent_type, key)``, with no connection."""
    return cls.create(AgentId(cls.agent_type, key))


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 5.0,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Call `check` until it returns something truthy (and return it) or `timeout` passes.

    Exceptions from `check` count as "not yet"; the last one is chained on failure.

    Raises:
        AssertionError: `check` never succeeded within `timeout`.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last_error = None
        except (AssertionError, Exception) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not hold within {timeout:g}s") from last_error
        await asyncio.sleep(interval)


class WorkerProcess:
    """``mesh worker`` in a child process.

    Args:
        nats_url: The server to connect to.
        agents: ``module:Class`` specs.
        worker_id: The worker's id.
        heartbeat_interval: Seconds between heartbeats.
        prefix: The mesh prefix.
        extra_args: More ``mesh worker`` options.
        log_level: The worker's log level.
        log_path: Where its output goes; this process's stderr when ``None``.
        env: Extra environment variables.
    """

    def __init__(
        self,
        nats_url: str,
        agents: Sequence[str],
        *,
        worker_id: str,
        heartbeat_interval: float = 0.5,
        prefix: str = "mesh",
        extra_args: Sequence[str] = (),
        log_level: str = "warning",
        log_path: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = [
            sys.executable,
            "-m",
            "mesh.cli",
            "--nats",
            nats_url,
            "--prefix",
            prefix,
            "--log-level",
            log_level,
            "worker",
            *agents,
            "--worker-id",
            worker_id,
            "--heartbeat-interval",
            str(heartbeat_interval),
            *extra_args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the process; its log goes to `log_path`, or to this process's stderr."""
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log or subprocess.DEVNULL,
                stderr=log,
                env=self.env,
            )
        finally:
            if log is not None:
                log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def terminate(self) -> None:
        """SIGTERM: drain in-flight work and leave."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: vanish without a word."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    async def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the process has ended."""
        assert self.process is not None
        process = self.process
        async with asyncio.timeout(timeout):
            while process.poll() is None:  # noqa: ASYNC110 - a child process has no event
                await asyncio.sleep(0.02)
        return process.returncode

    async def aclose(self, timeout: float = 10.0) -> None:
        """Terminate, then kill if it does not end within `timeout`, without blocking the loop."""
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            await self.wait(timeout)
        except TimeoutError:
            self.kill()
            await self.wait(timeout)

    def stop(self) -> None:
        """Terminate, then kill if it does not end within 10 s, blocking. Idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
