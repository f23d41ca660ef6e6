"""Metrics, the evaluate step, reports and the results files."""
