"""Benchmarks of gdpm: peer comparison (``python -m bench``) and slave failover (bench/failover.py)."""
