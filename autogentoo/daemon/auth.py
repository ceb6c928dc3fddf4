"""Who is calling, and what they may do.

The caller is whatever SO_PEERCRED says about the other end of the socket:
the kernel's answer, never anything the client sends, and never /proc/<pid>
(a pid can be recycled). Over SSH the other end is sshd acting for the
remote login user, so the same policy applies with no extra secret.

Names and groups come from the system user database (pwd/grp and
getgrouplist), so LDAP and SSSD users work unchanged.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from autogentoo.daemon.config import Policy, Role
from autogentoo.errors import AgError, Code, Forbidden

_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int
    user: str
    groups: tuple[str, ...]
    gids: tuple[int, ...]
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def resolve(uid: int, gid: int, pid: int, policy: Policy) -> Caller:
    try:
        pw = pwd.getpwuid(uid)
        user = pw.pw_name
        gids = tuple(sorted(set(os.getgrouplist(user, pw.pw_gid)) | {gid}))
    except KeyError:
        # A uid with no passwd entry (a container's user, a deleted account)
        # can still be named in policy by number.
        user = str(uid)
        gids = (gid,)
    groups = []
    for g in gids:
        try:
            groups.append(grp.getgrgid(g).gr_name)
        except KeyError:
            groups.append(str(g))
    role = role_for(uid, user, tuple(groups), policy)
    return Caller(uid, gid, pid, user, tuple(groups), gids, role)


def role_for(uid: int, user: str, groups: tuple[str, ...], policy: Policy) -> Role:
    if uid == 0:
        return Role.ADMIN
    # The strongest grant wins: a user listed as viewer who is also in an
    # admin group is an admin, as with libvirt's polkit rules.
    candidates = [policy.users.get(user, Role.NONE), policy.users.get(str(uid), Role.NONE)]
    candidates += [policy.groups.get(g, Role.NONE) for g in groups]
    return max(candidates, key=lambda r: r.rank)


def require(caller: Caller, needed: Role, policy: Policy) -> None:
    if caller.role.allows(needed):
        return
    if caller.role is Role.NONE:
        raise AgError(
            f"user {caller.user!r} (uid {caller.uid}) is not allowed to use autogentoo:"
            f" ask an administrator to add you to the {policy.join_group!r} group",
            code=Code.FORBIDDEN,
            user=caller.user,
            role=str(caller.role),
            join_group=policy.join_group,
        )
    raise Forbidden(
        f"this needs the {needed} role; user {caller.user!r} has {caller.role}",
        user=caller.user,
        role=str(caller.role),
        needed=str(needed),
    )
