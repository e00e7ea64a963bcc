"""Request/reply through mesh (gateway and worker processes) against raw NATS.

    python bench/rpc.py --requests 5000 --concurrency 32

Same as `mesh bench`: both paths are measured in one run on one embedded server,
and the table ends with their ratios.
"""

from __future__ import annotations

import argparse

from mesh.bench import run_bench
from mesh.cli import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    return run(run_bench(requests=args.requests, concurrency=args.concurrency))


if __name__ == "__main__":
    raise SystemExit(main())
