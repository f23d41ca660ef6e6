"""Prefect flows that wrap the same step functions the DVC stages and the CLI call."""
