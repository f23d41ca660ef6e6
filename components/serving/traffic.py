"""A/B assignment: a stable hash of the user (or request) id, so one user always sees one version."""
from __future__ import annotations

import hashlib


def variant_for(key: str, share_b: float) -> str:
    """'B' for a `share_b` fraction of keys, 'A' otherwise; the same key always gets the same answer
    (sha256, not Python's per-process salted hash, so restarts and several workers agree)."""
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return "B" if point < share_b else "A"
