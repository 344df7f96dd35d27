"""Peers of the service measured in the same run: tests/bench/run.py starts them."""
