"""The gateway benchmark, as a script: the same as ``mesh bench``.

python bench/rpc.py --requests 5000 --inflight 100000 --json bench.json
"""

from __future__ import annotations

import sys

from mesh.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
