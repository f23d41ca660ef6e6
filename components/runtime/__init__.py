"""Run plumbing: params and their schema, errors, locks, atomic writes, the step table."""
