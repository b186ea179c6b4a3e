"""Release: the gate that decides which quantizations ship (gate.py)."""
