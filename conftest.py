"""Pytest root configuration: keeps test runs on the CPU and quiet."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
