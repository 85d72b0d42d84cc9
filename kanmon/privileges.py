"""Running as an unprivileged user: `[server] user`/`group`.

Role: when `kanmon serve` starts as root with `[server] user` set, prepare data_dir
(created 0700, owned by that user) and switch the whole process to the user and group
(supplementary groups from /etc/group, then setgid, then setuid; umask 077) *before* anything is
opened, keeping exactly one capability, CAP_NET_BIND_SERVICE, so the listeners can
bind ports below 1024 at start and at a reload, like a systemd unit with
``AmbientCapabilities=CAP_NET_BIND_SERVICE``. Every file the node creates is then the
user's. Started as that user already (systemd ``User=``), nothing changes.

Whoever it runs as, data_dir is private: make_private() corrects at start what an
older version left readable (data_dir 0700, files 0600), and run_node sets umask 077.

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
import stat
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
    was not the user's, else the entries at its top level, in log/ and in spool/ (a
    folder a newer version adds there, such as spool/recycle/, made by a command run as
    root before the node's first start)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(data_dir)
    if st.st_uid != uid:
        for root, dirs, files in os.walk(data_dir):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)
    else:
        for sub in (data_dir, data_dir / "log", data_dir / "spool"):
            if sub.is_dir():
                for entry in os.scandir(sub):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        os.lchown(entry.path, uid, gid)
    os.chown(data_dir, uid, gid)
    os.chmod(data_dir, 0o700)


def hand_over_to_owner(data_dir: Path) -> None:
    """Run as root on a data_dir of the service's user: what root made in it (a restore,
    a spool a command made) becomes that user's, or the server could not read it."""
    if os.geteuid() != 0:
        return
    st = os.stat(data_dir)
    if st.st_uid == 0:
        return
    # By directory descriptors, never following a link: the tree is writable by that user,
    # who could swap a directory for a link to /etc between a listing and the descent.
    for _root, dirs, files, dir_fd in os.fwalk(data_dir, follow_symlinks=False):
        for name in [*dirs, *files]:
            try:
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_uid == 0:
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:  # gone meanwhile
                continue


PRIVATE_SUBDIRS = ("log", "spool", "state")  # their entries are checked too, not what lies deeper
SHARED = ("maildrop",)  # the local sendmail's drop directory: its mode is the pickup's (docs/sendmail.md)


def make_private(data_dir: Path) -> list[str]:
    """data_dir private and what an older version may have left readable in it too:
    data_dir loses every bit for others and the group's write bit (so 0700, or the 0710
    or 0750 an administrator gave the commands' group, docs/sendmail.md); its top-level
    entries and those of log/, spool/ and state/ become 0600 (0700 for directories).
    Deeper files (queue files, journals, mail) have always been created 0600 in 0700
    directories, and a walk of every mailbox at each start would be costly.
    Returns the paths corrected (relative to data_dir), for the start-up event."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    corrected: list[str] = []

    def fix(path: Path, name: str, keep: int = 0o700) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode) or not st.st_mode & 0o777 & ~keep:
            return
        os.chmod(path, stat.S_IMODE(st.st_mode) & keep)
        corrected.append(name)

    # Anything for others is an older version's default: 0700. Group bits alone are the
    # administrator's (the commands' group): kept, but not the group's write bit.
    fix(data_dir, ".", keep=0o700 if os.stat(data_dir).st_mode & 0o007 else 0o750)
    with os.scandir(data_dir) as top:
        entries = [e for e in top if e.name not in SHARED]
    for entry in entries:
        fix(Path(entry.path), entry.name)
        if entry.name in PRIVATE_SUBDIRS and entry.is_dir(follow_symlinks=False):
            with os.scandir(entry.path) as sub:
                for e in sub:
                    fix(Path(e.path), f"{entry.name}/{e.name}")
    return corrected


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
