"""The artefact store: what jobs produce, kept by the daemon and streamed to clients.

An artefact is a directory `<artifacts_dir>/<id>/` holding its files (the
main one first, then companions such as a kernel's .config or a boot log)
and a row in the state database. An artefact with a cache key is content
addressed: the same inputs find the artefact already built. A row is written
only after every file is complete and in place, so a crash or a full disk
never leaves an artefact registered half made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autogentoo.daemon import faults
from autogentoo.daemon import state as st
from autogentoo.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class Artifact:
    id: str
    kind: str
    cache_key: str | None
    size: int
    sha256: str
    owner_uid: int
    job_id: int | None
    root: str | None
    created: float
    meta: dict[str, Any]
    dir: Path

    @property
    def files(self) -> list[str]:
        return list(self.meta.get("files", []))

    @property
    def path(self) -> Path:
        """The main file."""
        return self.dir / self.files[0]

    @property
    def parts(self) -> bool:
        """The artefact's content is its files concatenated (a layered initramfs)."""
        return bool(self.meta.get("parts"))

    @property
    def name(self) -> str:
        """The file name a download gets."""
        return str(self.meta.get("name") or self.files[0])

    def json(self) -> dict[str, Any]:
        # The store's own fields win over anything a job put in meta.
        return {
            **{k: v for k, v in self.meta.items() if k != "files"},
            "id": self.id,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "owner_uid": self.owner_uid,
            "job": self.job_id,
            "root": self.root,
            "created": self.created,
            "files": self.files,
            "name": self.name,
        }


def _row(row: Any, base: Path) -> Artifact:
    return Artifact(
        row["id"],
        row["kind"],
        row["cache_key"],
        row["size"],
        row["sha256"],
        row["owner_uid"],
        row["job_id"],
        row["root"],
        row["created"],
        st.loads(row["meta"]),
        base / row["id"],
    )


class Store:
    def __init__(self, state: st.State, base: Path) -> None:
        self.state = state
        self.base = base
        base.mkdir(parents=True, exist_ok=True, mode=0o750)

    def get(self, artifact_id: str) -> Artifact:
        if not (len(artifact_id) == 16 and all(c in "0123456789abcdef" for c in artifact_id)):
            raise InvalidArgument(f"{artifact_id[:40]!r} is not an artefact id")
        row = self.state.one("SELECT * FROM artifacts WHERE id=?", (artifact_id,))
        if row is None:
            raise NotFound(f"there is no artefact {artifact_id}", artifact=artifact_id)
        return _row(row, self.base)

    def lookup(self, cache_key: str) -> Artifact | None:
        """The artefact built from these inputs, if it is still whole."""
        row = self.state.one("SELECT * FROM artifacts WHERE cache_key=?", (cache_key,))
        if row is None:
            return None
        art = _row(row, self.base)
        if not all((art.dir / f).is_file() for f in art.files):
            # Someone pruned the files by hand: forget it and build again.
            self.delete(art)
            return None
        return art

    def find(
        self, *, root: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Artifact]:
        sql, args = "SELECT * FROM artifacts WHERE 1=1", list[Any]()
        if root is not None:
            sql += " AND root=?"
            args.append(root)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        sql += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        return [_row(r, self.base) for r in self.state.all(sql, args)]

    def staging(self) -> Path:
        """A fresh directory to build an artefact's files in, inside the store's filesystem."""
        path = self.base / f".new-{secrets.token_hex(8)}"
        path.mkdir(mode=0o750)
        return path

    def add(
        self,
        staging: Path,
        files: list[str],
        *,
        kind: str,
        owner_uid: int,
        sha256: str,
        cache_key: str | None = None,
        job_id: int | None = None,
        root: str | None = None,
        meta: dict[str, Any] | None = None,
        size: int | None = None,
    ) -> Artifact:
        """Move a staged directory into the store and register it.

        files[0] is the main file. The rename is atomic; the row comes last.
        """
        for f in files:
            if "/" in f or f.startswith(".") or not (staging / f).is_file():
                raise InvalidArgument(f"artefact file {f!r} is missing or not a plain name")
        artifact_id = secrets.token_hex(8)
        final = self.base / artifact_id
        os.rename(staging, final)
        faults.point_sync("artifact.renamed")
        if size is None:
            size = (final / files[0]).stat().st_size
        full_meta = {**(meta or {}), "files": files}
        try:
            self.state.execute(
                "INSERT INTO artifacts (id, kind, cache_key, size, sha256, owner_uid, job_id, root,"
                " created, meta) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    artifact_id,
                    kind,
                    cache_key,
                    size,
                    sha256,
                    owner_uid,
                    job_id,
                    root,
                    st.now(),
                    st.dumps(full_meta),
                ),
            )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return self.get(artifact_id)

    def delete(self, art: Artifact) -> None:
        self.state.execute("DELETE FROM artifacts WHERE id=?", (art.id,))
        shutil.rmtree(art.dir, ignore_errors=True)

    def recover(self) -> None:
        """Remove what a crash left: staging dirs, and dirs with no row."""
        known = {r["id"] for r in self.state.all("SELECT id FROM artifacts")}
        for entry in self.base.iterdir():
            if entry.name.startswith(".new-") or (
                entry.is_dir() and entry.name not in known and len(entry.name) == 16
            ):
                shutil.rmtree(entry, ignore_errors=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """Put src at dest without copying when both are on one filesystem."""
    try:
        os.link(src, dest)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        shutil.copyfile(src, dest)
