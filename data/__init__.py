"""Home of `python -m data.prepare` in a checkout; the data pipeline is `powerattn.data` (not installed)."""
