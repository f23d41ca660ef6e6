"""The step table: the pipeline's steps by name (steps.py) and the locked runner DVC stages, flows and the
CLI call (stages.py). It sits above every step it names; components/runtime knows the names alone."""
