"""Example agent types, each runnable as a worker: ``python -m workers.<name>``."""
