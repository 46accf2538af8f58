"""The model registry of scheduled retraining: a champion pointer, a history, a lock.

Lives in storage next to the runs (a local folder or an S3 prefix)::

    <root>/registry/champion.json   the promoted model: run, export folder, scores
    <root>/registry/history.jsonl   one line per retrain or rollback, added at the end
    <root>/registry/lock.json       held by the retrain running now (with an expiry)

The champion pointer is one small object replaced in a single write (local:
temp file + rename; S3: one PUT), only after the new model is fully written
and re-loaded, so a reader sees the old champion or the new one, never half of
one. The history is written the same way: S3 has no append, so adding a line
rewrites the whole file (its earlier lines byte for byte, under the lock, in
one write), and a reader sees it with or without the new line. The lock is a conditional create (local ``O_EXCL``; S3 ``If-None-Match``),
so two retrains on a schedule cannot both run; one whose holder crashed expires.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from cluster import storage

REGISTRY_DIR = "registry"
CHAMPION_FILE = "champion.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = "lock.json"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (nothing to roll back to, say)."""


class RegistryLocked(RuntimeError):
    """Another retrain holds the lock (and it has not expired)."""


class Registry:
    """The registry folder under a storage root (local path or URI)."""

    def __init__(self, root: str) -> None:
        self.root = storage.normalize(root)
        self.folder = storage.join(self.root, REGISTRY_DIR)

    def _path(self, name: str) -> str:
        return storage.join(self.folder, name)

    def champion(self) -> dict[str, Any] | None:
        """The current champion record, or ``None`` before the first promotion."""
        path = self._path(CHAMPION_FILE)
        return json.loads(storage.read_text(path)) if storage.exists(path) else None

    def history(self) -> list[dict[str, Any]]:
        """Every retrain recorded so far, oldest first."""
        path = self._path(HISTORY_FILE)
        if not storage.exists(path):
            return []
        return [json.loads(x) for x in storage.read_text(path).splitlines() if x.strip()]

    def record(self, entry: dict[str, Any]) -> None:
        """Append one retrain to the history (call with the lock held)."""
        # S3 has no append: the file is rewritten, its old lines unchanged, the lock held.
        path = self._path(HISTORY_FILE)
        old = storage.read_text(path) if storage.exists(path) else ""
        if old and not old.endswith("\n"):
            old += "\n"
        storage.write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")

    def promote(self, record: dict[str, Any]) -> None:
        """Make ``record`` the champion, in one write (call with the lock held)."""
        storage.write_text(self._path(CHAMPION_FILE), json.dumps(record, indent=2, sort_keys=True))

    def rollback(self, to_run: str | None = None, by: str | None = None) -> dict[str, Any]:
        """Make an earlier promoted model the champion again, and record it (call with the
        lock held). ``to_run``: that run's promoted model; default: the one promoted
        before the current champion was. Returns the new champion record."""
        champion = self.champion()
        current = champion["run"] if champion else None
        promotions = [e for e in self.history() if e.get("decision") == "promote"]
        runs = [e["challenger"]["run"] for e in promotions]
        if to_run is None:
            # promoted before the current champion's own promotion (the last one, if repeated)
            cut = len(runs) - 1 - runs[::-1].index(current) if current in runs else len(runs)
            earlier = [r for r in runs[:cut] if r != current]
            if not earlier:
                raise RegistryError(f"no model was promoted before the champion {current}")
            to_run = earlier[-1]
        matches = [e["challenger"] for e in promotions if e["challenger"]["run"] == to_run]
        if not matches:
            valid = ", ".join(dict.fromkeys(runs)) or "none"
            raise RegistryError(f"{to_run} was never promoted; promoted runs: {valid}")
        reason = f"rolled back from {current}" + (f" by {by}" if by else "")
        record = {**matches[-1], "reason": reason}
        self.promote(record)
        self.record(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "run": to_run,
                "decision": "rollback",
                "reason": reason,
                "challenger": matches[-1],
                "champion": {"run": current} if current else None,
            }
        )
        return record

    @contextlib.contextmanager
    def lock(self, ttl_s: float, owner: str | None = None) -> Iterator[dict[str, Any]]:
        """Hold the registry's lock for one retrain; ``RegistryLocked`` if another holds it.

        A lock older than its ``expires_at`` (a holder that crashed) is taken over
        with a conditional replace, so two waiting retrains cannot both take it.
        """
        path = self._path(LOCK_FILE)
        now = time.time()
        mine = {
            "owner": owner or f"{socket.gethostname()}:{os.getpid()}",
            "acquired_at": now,
            "expires_at": now + ttl_s,
        }
        text = json.dumps(mine, sort_keys=True)
        try:
            storage.create_exclusive(path, text)
        except storage.Exists:
            held_text = storage.read_text(path)
            held = json.loads(held_text)
            if held.get("expires_at", 0) > time.time():
                raise RegistryLocked(
                    f"another retrain holds {path} (owner {held.get('owner')}, until "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held['expires_at']))})"
                ) from None
            try:
                storage.replace_unchanged(path, text, held_text)
            except storage.Exists:
                raise RegistryLocked(f"another retrain took over the expired lock {path}") from None
        try:
            yield mine
        finally:
            storage.delete_file(path)
