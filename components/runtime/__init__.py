"""Run plumbing, the layer every other one stands on: paths, params and their schema, errors, locks,
atomic writes. It imports nothing of the project above it (the step table is components/pipeline)."""
