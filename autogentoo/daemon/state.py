"""The state database: roots, jobs, uploads and artefacts in SQLite.

SQLite is the embedded default: nothing to set up, one file under the state
directory, WAL so readers never wait for the writer. Queries are small and
run on the event loop thread; the connection is never shared across threads.
The schema moves forward through numbered migrations recorded in
PRAGMA user_version, each applied in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autogentoo.errors import NoSpace

MIGRATIONS: Sequence[str] = (
    # 1: the first schema
    """
    CREATE TABLE roots (
        name        TEXT PRIMARY KEY,
        owner_uid   INTEGER NOT NULL,
        group_gid   INTEGER,
        backend     TEXT NOT NULL,
        created     REAL NOT NULL,
        source      TEXT NOT NULL DEFAULT '{}',
        state       TEXT NOT NULL DEFAULT 'ready'
    );
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        root        TEXT,
        owner_uid   INTEGER NOT NULL,
        state       TEXT NOT NULL,
        created     REAL NOT NULL,
        started     REAL,
        ended       REAL,
        returncode  INTEGER,
        error_code  TEXT,
        error       TEXT,
        params      TEXT NOT NULL DEFAULT '{}',
        result      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_root ON jobs(root);
    CREATE TABLE uploads (
        id          TEXT PRIMARY KEY,
        owner_uid   INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        filename    TEXT NOT NULL,
        created     REAL NOT NULL
    );
    CREATE TABLE artifacts (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        cache_key   TEXT UNIQUE,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        owner_uid   INTEGER NOT NULL,
        job_id      INTEGER,
        root        TEXT,
        created     REAL NOT NULL,
        meta        TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX artifacts_root ON artifacts(root);
    """,
    # 2: inputs fetched from upstream mirrors, each with where it came from,
    # its digest and the key that signed it
    """
    CREATE TABLE stage3s (
        digest      TEXT PRIMARY KEY,
        profile     TEXT NOT NULL,
        filename    TEXT NOT NULL,
        published   TEXT NOT NULL,
        url         TEXT NOT NULL,
        signer      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        fetched     REAL NOT NULL
    );
    CREATE INDEX stage3s_profile ON stage3s(profile);
    CREATE TABLE repo_snapshots (
        name        TEXT PRIMARY KEY,
        digest      TEXT NOT NULL UNIQUE,
        url         TEXT NOT NULL,
        signer      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        image_size  INTEGER NOT NULL,
        fetched     REAL NOT NULL,
        active      INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE kernel_sources (
        version     TEXT PRIMARY KEY,
        digest      TEXT NOT NULL,
        filename    TEXT NOT NULL,
        url         TEXT NOT NULL,
        signer      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        fetched     REAL NOT NULL
    );
    """,
    # 3: kernel sources registered for pack-kernel
    """
    CREATE TABLE kernels (
        name        TEXT PRIMARY KEY,
        path        TEXT NOT NULL,
        owned       INTEGER NOT NULL,
        owner_uid   INTEGER NOT NULL,
        created     REAL NOT NULL,
        source      TEXT NOT NULL DEFAULT '{}'
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    pass


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a daemon crash; only an OS crash can
        # lose the last transactions, which then replay as "interrupted".
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.migrate()

    def close(self) -> None:
        self.db.close()

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.version
        if current > SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has schema version {current}, newer than this autogentoo"
                f" ({SCHEMA_VERSION}); upgrade autogentoo or restore a backup"
            )
        for number in range(current, SCHEMA_VERSION):
            with self.transaction():
                for statement in _statements(MIGRATIONS[number]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number + 1}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._full():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextmanager
    def _full(self) -> Iterator[None]:
        """A full disk is the user's no_space, not the daemon's internal error."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise NoSpace(
                f"no space left for the state database {self.path}; free some space there"
            ) from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._full():
            return self.db.execute(sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(self.db.execute(sql, params).fetchall())


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def now() -> float:
    return time.time()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> Any:
    return json.loads(text) if text else {}
