"""The embedded server runner and deploy/nats.conf start real servers with JetStream."""

from __future__ import annotations

import subprocess

import nats
import pytest

from mesh.server import NatsServer, NatsServerError, find_nats_server
from tests.conftest import REPO

CONFIG = REPO / "deploy" / "nats.conf"


def test_deploy_config_passes_the_servers_own_check() -> None:
    result = subprocess.run(
        [find_nats_server(), "-c", str(CONFIG), "-t"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "valid" in result.stderr + result.stdout


async def test_deploy_config_starts_a_jetstream_server(tmp_path: pytest.TempPathFactory) -> None:
    # Same file, but a free port and store of our own so the test never collides.
    server = NatsServer(
        config_file=CONFIG, store_dir=str(tmp_path), extra_args=["-p", "-1", "-m", "-1"]
    )
    async with server:
        assert "mesh-1" in server.output
        nc = await nats.connect(server.url)
        try:
            kv = await nc.jetstream().create_key_value(bucket="smoke")
            await kv.put("k", b"v")
            assert (await kv.get("k")).value == b"v"
        finally:
            await nc.drain()


async def test_embedded_server_picks_a_free_port_and_cleans_up() -> None:
    first, second = NatsServer(), NatsServer()
    async with first, second:
        assert first.port != second.port
        assert first.port > 0
        pid = first.pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def test_unstartable_server_raises_with_its_output() -> None:
    with pytest.raises(NatsServerError, match="did not start"):
        NatsServer(extra_args=["--no-such-flag"]).start()
