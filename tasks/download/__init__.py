"""Stage download: fetch the adapter and training metadata from the training box (local, ssh, vastai)."""
