"""One renderer per runtime (see base.py for the contract)."""
