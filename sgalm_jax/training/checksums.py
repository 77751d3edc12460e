"""SHA-256 manifests of checkpoint folders: written when a checkpoint is complete, verified before
it is restored, so that flipped or truncated bytes are caught by name instead of resuming a run on
silently damaged weights.

The manifest is ``<step>/sgalm_checksums.json``: ``{"version": 1, "algorithm": "sha256",
"files": {relative path: {"size": bytes, "sha256": hex}}}``, every file of the step folder but
itself and Orbax's commit bookkeeping (:data:`MUTABLE`). It is written atomically (:func:`sgalm_jax.fileio.atomic_write`). Cost: one sequential read
of the checkpoint at save time (in Orbax's background thread for async saves) and one at restore
(about 1 GB/s per core); ``checkpoint.checksums = False`` turns both off.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from sgalm_jax.fileio import atomic_write_json

MANIFEST = "sgalm_checksums.json"
_CHUNK = 4 << 20
# Orbax's own bookkeeping, rewritten when it renames the folder into place (after the manifest is
# written): commit timestamps, not data. Every array, array-metadata and meta file is covered.
MUTABLE = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and name not in MUTABLE and not name.startswith(f".{MANIFEST}."):
                out.append(rel)
    return sorted(out)


def build_manifest(folder: str) -> dict[str, Any]:
    """The manifest dict of every file under ``folder`` (without writing it)."""
    files = {}
    for rel in _files(folder):
        full = os.path.join(folder, rel)
        files[rel] = {"size": os.path.getsize(full), "sha256": file_sha256(full)}
    return {"version": 1, "algorithm": "sha256", "files": files}


def write_manifest(folder: str) -> None:
    """Hash every file under ``folder`` and write ``folder/sgalm_checksums.json`` atomically."""
    atomic_write_json(os.path.join(folder, MANIFEST), build_manifest(folder), indent=1,
                      sort_keys=True)


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def verify_manifest(folder: str) -> str | None:
    """None when every file listed in the manifest is present with its size and hash; otherwise
    the first problem, as ``"relative/path: what is wrong"``. A missing manifest is a problem
    too (callers that accept unverified checkpoints test :func:`has_manifest` first)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return f"{MANIFEST}: missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"
    for rel, want in sorted(files.items()):
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel}: missing"
        try:
            size = os.path.getsize(full)
            if size != want.get("size"):
                return f"{rel}: {size} bytes, {want.get('size')} when saved (truncated or changed)"
            if file_sha256(full) != want.get("sha256"):
                return f"{rel}: SHA-256 differs from the one recorded at save time"
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror or e})"
    return None


__all__ = ["MANIFEST", "build_manifest", "file_sha256", "has_manifest", "verify_manifest",
           "write_manifest"]
