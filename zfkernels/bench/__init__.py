"""Benchmarks of the zfkernels ops against stock PyTorch: `zfkernels bench` and the pytest-benchmark suite.

cases.py defines what is measured (once, for both), runner.py measures it, report.py writes it up.
"""
