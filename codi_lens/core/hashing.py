"""Content hashes of files: what a result records to name the checkpoint that made it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of a file's content, read in chunks (a 3.4 GB checkpoint takes seconds, not memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
