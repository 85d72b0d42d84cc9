"""Running as an unprivileged user: `[server] user`/`group`.

Role: when `kanmon serve` starts as root with `[server] user` set, prepare data_dir
(created 0700, owned by that user) and switch the whole process to the user and group
(supplementary groups from /etc/group, then setgid, then setuid; umask 077) *before* anything is
opened, keeping exactly one capability, CAP_NET_BIND_SERVICE, so the listeners can
bind ports below 1024 at start and at a reload, like a systemd unit with
``AmbientCapabilities=CAP_NET_BIND_SERVICE``. Every file the node creates is then the
user's. Started as that user already (systemd ``User=``), nothing changes.

Trusts: the validated config, the passwd and group databases.
Never: continue as root when a user was asked for and the switch failed, or keep any
capability but CAP_NET_BIND_SERVICE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
from pathlib import Path

CAP_NET_BIND_SERVICE = 10
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The switch to the service user cannot be made; the message says why."""


def lookup(user: str, group: str | None) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"[server] user: no user {user!r} on this system") from None
    if group is None:
        return pw.pw_uid, pw.pw_gid
    try:
        return pw.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"[server] group: no group {group!r} on this system") from None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _keep_only_bind_capability(libc: ctypes.CDLL) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    bit = 1 << CAP_NET_BIND_SERVICE
    data[0].effective = data[0].permitted = bit
    if libc.capset(ctypes.byref(header), data) != 0:
        e = ctypes.get_errno()
        raise PrivilegeError(f"cannot keep CAP_NET_BIND_SERVICE: {os.strerror(e)}")


def prepare_data_dir(data_dir: Path, uid: int, gid: int) -> None:
    """data_dir exists, 0700, owned by the user; what root left in it (an earlier run
    as root, a command run as root) is handed over too: everything when data_dir itself
    was not the user's, else the entries at its top level and in log/."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(data_dir)
    if st.st_uid != uid:
        for root, dirs, files in os.walk(data_dir):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)
    else:
        for sub in (data_dir, data_dir / "log"):
            if sub.is_dir():
                for entry in os.scandir(sub):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        os.lchown(entry.path, uid, gid)
    os.chown(data_dir, uid, gid)
    os.chmod(data_dir, 0o700)


def drop_privileges(user: str | None, group: str | None, data_dir: Path) -> str | None:
    """Switch to `user` (see the module docstring); returns what was done, for the log
    (None: no user asked for). Call it before any thread starts: capabilities are
    per thread, and threads started later inherit them."""
    if user is None:
        return None
    uid, gid = lookup(user, group)
    os.umask(0o077)  # what the node creates without an explicit mode is private too
    euid = os.geteuid()
    if euid != 0:
        if euid == uid:
            return f"running as {user} (uid {uid})"
        raise PrivilegeError(f"[server] user = {user!r}: started as uid {euid}, neither root nor {user}")
    prepare_data_dir(data_dir, uid, gid)
    libc = _libc()
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"prctl(PR_SET_KEEPCAPS): {os.strerror(ctypes.get_errno())}")
    os.initgroups(user, gid)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    _keep_only_bind_capability(libc)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no set-uid program run later gains anything
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise PrivilegeError("root could be regained after the switch")
    return f"running as {user} (uid {uid}, gid {gid}), keeping CAP_NET_BIND_SERVICE only"
