"""Benchmarks: threshold sweeps (accuracy vs measured speed) and load generation."""
