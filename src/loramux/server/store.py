"""The server's data directory: a SQLite catalog beside the files it describes.

    DATA_DIR/
      loramux.db          files, jobs, job events, checkpoints, adapters (WAL, synchronous=FULL)
      files/<id>.jsonl    uploaded files (written to a temporary name, fsynced, renamed)
      jobs/<id>/          each job's checkpoints
      adapters/<job id>/  fine-tuned adapters in PEFT's format (a deleted one is renamed to
                          .deleted-<job id> first, then removed; a crash in between leaves the
                          hidden name, which the next start removes)
      .lock               held while a server runs: a second server on the same directory is refused
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from loramux.atomic import write_file_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, created_at INTEGER, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at INTEGER, status TEXT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, job_id TEXT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (id TEXT PRIMARY KEY, job_id TEXT, step INTEGER, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, step);
"""
DELETED = ".deleted-"  # the prefix of an adapter directory being deleted


class DataDirLocked(RuntimeError):
    """Another server holds the data directory."""


class UnknownCursor(LookupError):
    """A page was asked for after an id that is not in the list."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir).expanduser().resolve()
        for sub in ("files", "jobs", "adapters"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirLocked(f"another loramux server is using {self.root}; stop it or choose another --data-dir") from None
        self._db = sqlite3.connect(self.root / "loramux.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._mutex = threading.Lock()
        for leftover in (self.root / "adapters").glob(f"{DELETED}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def close(self) -> None:
        self._db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._mutex:
            return self._db.execute(sql, args).fetchall()

    # --- files ------------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        file_id = new_id("file")
        write_file_atomic(self.file_path(file_id), lambda tmp: tmp.write_bytes(content))
        record = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        self._exec("INSERT INTO files VALUES (?, ?, ?)", (file_id, record["created_at"], json.dumps(record)))
        return record

    def get_file(self, file_id: str) -> dict | None:
        rows = self._exec("SELECT data FROM files WHERE id = ?", (file_id,))
        return json.loads(rows[0][0]) if rows else None

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10_000,
                   order: str = "desc") -> tuple[list[dict], bool]:
        """Files by creation time (`order` "desc": newest first), of one purpose if given."""
        where, args = ("json_extract(data, '$.purpose') = ?", (purpose,)) if purpose is not None else ("1", ())
        return self._page("files", ("created_at", "rowid"), after, limit, descending=order == "desc", where=where, args=args)

    def delete_file(self, file_id: str) -> bool:
        if self.get_file(file_id) is None:
            return False
        self._exec("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    # --- jobs ---------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def put_job(self, job: dict) -> None:
        # an update keeps the row (and its rowid: creation order within a second, for paging)
        self._exec("INSERT INTO jobs VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
                   (job["id"], job["created_at"], job["status"], json.dumps(job)))

    def get_job(self, job_id: str) -> dict | None:
        rows = self._exec("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows else None

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first (created_at is in whole seconds; the rowid orders jobs of one second)."""
        return self._page("jobs", ("created_at", "rowid"), after, limit)

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        return [json.loads(r[0]) for r in self._exec(f"SELECT data FROM jobs WHERE status IN ({marks}) ORDER BY created_at", statuses)]

    def add_event(self, job_id: str, event: dict) -> None:
        self._exec("INSERT INTO events (id, job_id, data) VALUES (?, ?, ?)", (event["id"], job_id, json.dumps(event)))

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """The job's events, newest first."""
        return self._page("events", ("seq",), after, limit, scope=("job_id = ?", (job_id,)))

    def add_checkpoint(self, job_id: str, checkpoint: dict) -> None:
        self._exec("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                   (checkpoint["id"], job_id, checkpoint["step_number"], json.dumps(checkpoint)))

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """The job's checkpoints, latest step first."""
        return self._page("checkpoints", ("step", "id"), after, limit, scope=("job_id = ?", (job_id,)))

    # --- adapters -----------------------------------------------------------------------------------
    def put_adapter(self, name: str, info: dict[str, Any]) -> None:
        self._exec("INSERT OR REPLACE INTO adapters VALUES (?, ?)", (name, json.dumps(info)))

    def remove_adapter(self, name: str) -> None:
        self._exec("DELETE FROM adapters WHERE name = ?", (name,))

    def adapters(self) -> dict[str, dict]:
        return {name: json.loads(data) for name, data in self._exec("SELECT name, data FROM adapters ORDER BY name")}

    def delete_adapter_dir(self, path: str | os.PathLike) -> None:
        """Removes a fine-tuned adapter's directory (one of adapters/, never anything else): renamed
        at once, so that it is gone whole or not at all, then deleted."""
        directory = Path(path).resolve()
        if directory.parent != self.root / "adapters":
            raise ValueError(f"{directory} is not a fine-tuned adapter of {self.root}")
        if directory.exists():
            doomed = directory.with_name(f"{DELETED}{directory.name}")
            directory.rename(doomed)
            shutil.rmtree(doomed)

    def _page(self, table: str, key: tuple[str, ...], after: str | None, limit: int, *, descending: bool = True,
              scope: tuple[str, tuple] = ("1", ()), where: str = "1", args: tuple = ()) -> tuple[list[dict], bool]:
        """OpenAI's cursor paging over the rows of `table` in `scope` that match `where`, sorted by the
        columns `key` (unique together): at most `limit` rows that follow the row with id `after`, and
        whether more follow. Raises UnknownCursor if `after` is not a row of the scope. One indexed
        query per page, so paging through n rows costs O(n), not O(n^2)."""
        scope_sql, scope_args = scope
        sql, values = f"({scope_sql}) AND ({where})", (*scope_args, *args)
        columns = ", ".join(key)
        if after is not None:
            cursor = self._exec(f"SELECT {columns} FROM {table} WHERE id = ? AND ({scope_sql})", (after, *scope_args))
            if not cursor:
                raise UnknownCursor(after)
            sql += f" AND ({columns}) {'<' if descending else '>'} ({', '.join('?' * len(key))})"
            values += tuple(cursor[0])
        direction = " DESC" if descending else ""
        rows = self._exec(f"SELECT data FROM {table} WHERE {sql} ORDER BY {', '.join(c + direction for c in key)} LIMIT ?",
                          (*values, limit + 1))
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit
