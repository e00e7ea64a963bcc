"""A NATS cluster on this machine: several `NatsServer` nodes routed together.

For development (``mesh up --cluster 3``) and for tests of what a cluster does to mesh
(a node killed, restarted). Each node gets a free client port and cluster port; with
`config_files` (such as ``deploy/cluster/node-*.conf``) the files decide everything
else, and the ports given on the command line override theirs.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from mesh.server import NatsServer

CLUSTER_NAME = "mesh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsCluster:
    """`size` JetStream nodes in one cluster.

    Args:
        size: Nodes (3 for a quorum that survives one loss).
        config_files: One config file per node; generated settings when absent.
        store_dir: Parent of the nodes' stores; a temporary folder when absent.
        advertise: Tell clients the other nodes' URLs (so they fail over to them); off,
            a client knows only the URLs it was given, as behind a NAT.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        config_files: Sequence[str | Path] | None = None,
        store_dir: str | Path | None = None,
        advertise: bool = True,
    ) -> None:
        if config_files is not None and len(config_files) != size:
            raise ValueError(f"{size} nodes need {size} config files")
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="mesh-cluster-") if store_dir is None else None
        )
        base = Path(self._tmp.name if self._tmp else str(store_dir))
        self._cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in self._cluster_ports)
        self.nodes: list[NatsServer] = []
        for index in range(size):
            store = base / f"node-{index + 1}"
            store.mkdir(parents=True, exist_ok=True)
            args = [
                "--cluster",
                f"nats://127.0.0.1:{self._cluster_ports[index]}",
                "--routes",
                routes,
                "--cluster_name",
                CLUSTER_NAME,
                "--server_name",
                f"mesh-{index + 1}",
                "-p",
                str(free_port()),
                "-m",
                str(free_port()),
            ]
            if not advertise:
                args.append("--no_advertise=true")
            config = config_files[index] if config_files is not None else None
            if config is None:
                args += ["-js", "-sd", str(store)]
            self.nodes.append(
                NatsServer(
                    config_file=config,
                    store_dir=store,
                    jetstream=False,
                    extra_args=args,
                    start_timeout=30.0,
                )
            )

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated, as ``MESH_NATS_URL`` takes them."""
        return ",".join(node.url for node in self.nodes if node.port)

    def start(self) -> NatsCluster:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.start(), self.nodes))
        return self

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(keep_store=True), self.nodes))
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
