"""Data in: adapters per source, the data contract, readers, prepare and embed."""
