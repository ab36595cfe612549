"""Experiments and benchmarks (scripts run as ``python experiments/NAME.py``; importable for the tests)."""
