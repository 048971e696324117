"""Measurements: training throughput against the PyTorch baseline."""
