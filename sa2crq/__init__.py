"""The `sa2crq` command: above flows and components, calling both with plain imports."""
