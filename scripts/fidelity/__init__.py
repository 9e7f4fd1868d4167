"""The claims of docs/fidelity.md as experiments (run by scripts/reproduce.py)."""
