"""agctl stage3 fetch|list, repo fetch|list|use|delete, kernel fetch|list.

`register(sub, common)` adds the commands to agctl's subparsers; main.py
calls it.
"""

from __future__ import annotations

import argparse
from typing import Any

from autogentoo.client import output
from autogentoo.client.http import Client
from autogentoo.client.main import Handler, _detach, _name, _out, wait_job


def cmd_stage3_fetch(args: argparse.Namespace, c: Client) -> int:
    return wait_job(args, c, c.call("POST", "/stage3/fetch", body={"profile": args.profile}))


def cmd_stage3_list(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("GET", "/stage3"),
        lambda rows: output.table(rows, ["profile", "published", "filename", "signer", "digest"]),
    )


def cmd_repo_fetch(args: argparse.Namespace, c: Client) -> int:
    return wait_job(args, c, c.call("POST", "/repos/fetch"))


def cmd_repo_list(args: argparse.Namespace, c: Client) -> int:
    def human(rows: list[dict[str, Any]]) -> None:
        shown = [{**r, "active": "*" if r["active"] else ""} for r in rows]
        output.table(shown, ["active", "name", "fetched", "signer", "url"])

    return _out(args, c.call("GET", "/repos"), human)


def cmd_repo_use(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("POST", f"/repos/{args.name}/use"),
        lambda r: print(f"jobs now mount {r['name']} at /var/db/repos/gentoo"),
    )


def cmd_repo_delete(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args, c.call("DELETE", f"/repos/{args.name}"), lambda r: print(f"deleted {r['deleted']}")
    )


def cmd_kernel_fetch(args: argparse.Namespace, c: Client) -> int:
    return wait_job(args, c, c.call("POST", "/kernels/fetch", body={"version": args.version}))


def cmd_kernel_list(args: argparse.Namespace, c: Client) -> int:
    return _out(
        args,
        c.call("GET", "/kernels/fetched"),
        lambda rows: output.table(rows, ["version", "filename", "signer", "fetched"]),
    )


def register(sub: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    """Add the stage3, repo and kernel commands to agctl's subparsers."""

    def add(name: str, fn: Handler, help: str, parent: Any) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[common]
        )
        sp.set_defaults(func=fn)
        return sp

    p = sub.add_parser("stage3", help="fetch verified stage3 tarballs from the mirrors")
    s = p.add_subparsers(dest="stage3_command", metavar="ACTION", required=True)
    sp = add("fetch", cmd_stage3_fetch, "fetch and verify the newest stage3 of a profile", s)
    sp.add_argument("profile", help="as the mirror names it: amd64-openrc, arm64-systemd, ...")
    _detach(sp)
    add("list", cmd_stage3_list, "list the verified stage3s in the cache", s)

    p = sub.add_parser("repo", help="gentoo repository snapshots mounted into jobs")
    s = p.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    sp = add("fetch", cmd_repo_fetch, "fetch and verify the newest snapshot (squashfs)", s)
    _detach(sp)
    add("list", cmd_repo_list, "list the snapshots kept; * marks the one in use", s)
    sp = add("use", cmd_repo_use, "mount this snapshot in jobs from now on (admin)", s)
    sp.add_argument("name", type=_name)
    sp = add("delete", cmd_repo_delete, "delete a snapshot not in use (admin)", s)
    sp.add_argument("name", type=_name)

    p = sub.add_parser("kernel", help="kernel sources: add, list, fetch from mirrors, delete")
    s = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    sp = add("fetch", cmd_kernel_fetch, "fetch, verify, unpack and add a kernel release", s)
    sp.add_argument("version", help="6.1, 6.6.30, ...")
    _detach(sp)
    add("fetched", cmd_kernel_list, "list the kernel releases fetched, with their signers", s)
    return {"kernel": s}
