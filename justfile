# mesh tasks; `just --list` shows them.

venv := ".venv"
py := venv / "bin/python"

# Create the virtualenv and install mesh with its dev tools.
setup:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q -e '.[dev]'

# The scripted tour: embedded NATS, services, two workers.
demo:
    {{venv}}/bin/mesh demo

# Run the test suite against real nats-server processes.
test *ARGS:
    {{py}} -m pytest {{ARGS}}

# What CI checks besides tests.
lint:
    {{venv}}/bin/ruff check mesh workers tests bench
    {{venv}}/bin/ruff format --check mesh workers tests bench
    {{venv}}/bin/mypy mesh

# Request/reply through mesh against raw NATS, in one run.
bench *ARGS:
    {{venv}}/bin/mesh bench {{ARGS}}

# A 3-node NATS cluster from deploy/cluster (then MESH_REPLICAS=3 mesh serve ...).
cluster:
    mkdir -p data
    for n in 1 2 3; do {{venv}}/bin/nats-server -c deploy/cluster/node-$n.conf & done; wait

# The chaos tests, ten times their CI size.
chaos *ARGS:
    MESH_CHAOS_SCALE=10 {{py}} -m pytest -m chaos -s --timeout 1800 {{ARGS}}

# Everything CI runs.
check: lint test
