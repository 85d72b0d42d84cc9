"""`kanmon status`: the running node describes itself; the health verdict over it.

Role: node_status(plane) builds, inside `kanmon serve` (the control socket's "status"
request), one JSON document: process (pid, start time, version), runtime (Python's
version, whether the DATA scans run compiled), the config it runs (file, sha256,
whether the file changed since), listeners, the queue (active, new, deferred, held,
corrupt, oldest), active alerts, [[maintenance]] runs, the balancer.
fetch_status(data_dir) asks for it from outside (the CLI); health(doc) is the pure verdict the command prints and exits with: healthy or
degraded, and why.

Trusts: the node's own objects. Never: change anything, or keep the control socket's
lock longer than one spool scan (the scan runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from kanmon import __version__, scan
from kanmon.config import default_config_text
from kanmon.control import REFUSED_USER, ControlClient, DataDirLock, LockBusy, NoServer

HEALTHY, DEGRADED, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4  # exit codes, like `systemctl status`
STATUS_TIMEOUT = 60.0  # the spool scan of a large queue


def fetch_status(data_dir: Path) -> tuple[dict | None, str]:
    """(the running node's status document, or None; why not, when None)."""
    if not data_dir.is_dir():
        return None, f"data_dir {data_dir} does not exist"
    try:
        with ControlClient(data_dir, timeout=STATUS_TIMEOUT) as client:
            reply = client.request("status")
    except NoServer:
        lock = DataDirLock(data_dir)
        try:
            lock.acquire(wait=0)
            lock.release()
        except LockBusy as e:
            return None, f"no control socket answers, but {e} (starting, or an offline admin command)"
        except OSError as e:
            return None, f"no control socket in {data_dir} ({e.strerror or e})"
        return None, f"no kanmon serve for {data_dir}"
    except PermissionError as e:  # the socket (or data_dir) is not this user's to reach
        return None, f"{REFUSED_USER}: {e}"
    except (OSError, ValueError) as e:
        return None, f"control socket: {e}"
    if not reply.get("ok"):
        return None, f"the server answered: {reply.get('error')}"
    return reply["result"], ""


def config_digest(path: str | None, text: str | None = None) -> str | None:
    """sha256 of the config file's bytes (of the embedded default for None; of `text`, the
    file as a reload read it, when given); None if unreadable."""
    try:
        if text is not None:
            data = text.encode("utf-8")
        else:
            data = Path(path).read_bytes() if path is not None else default_config_text().encode()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()


async def node_status(plane) -> dict[str, Any]:
    """The status document of the node `plane` (a kanmon.admin.service.AdminPlane) belongs to."""
    from kanmon.admin.preflight import listeners  # noqa: PLC0415 - the one list of listen keys
    from kanmon.metrics import queue_snapshot  # noqa: PLC0415

    node = plane.node
    loop = asyncio.get_running_loop()
    active_ids = node.queue.active_ids() if node.queue is not None else set()
    snap = await loop.run_in_executor(None, queue_snapshot, node.spool, active_ids)
    alerts = []
    monitoring = getattr(node, "monitoring", None)
    if monitoring is not None:
        # (A test alert, `kanmon alert test`, keeps no state: the node is not degraded.)
        alerts = [{"category": s.category, "key": s.key, "text": s.text.splitlines()[0] if s.text else "",
                   "since": s.since} for s in monitoring.alerts.current()]
    balancer = None
    for service in node.services:
        if hasattr(service, "status") and hasattr(service, "status_file"):
            balancer = service.status()["virtual_servers"]
    digest_now = config_digest(node.config_source)
    return {
        "running": True,
        "pid": os.getpid(),
        "started_at": plane.started_at,
        "uptime": time.time() - plane.started_at,
        "version": __version__,
        # Python's version, and whether the DATA scans run compiled (the optional C part
        # is built where pip finds a compiler; without it they run in Python, slower).
        "runtime": {"python": platform.python_version(), "compiled_scans": scan.COMPILED},
        "hostname": node.config.server.hostname,
        "data_dir": str(Path(node.data_dir).resolve()),
        "config": {
            "file": node.config_source,
            "sha256": plane.config_sha256,
            "changed_on_disk": digest_now is not None and digest_now != plane.config_sha256,
            # A node following the cluster ([cluster]): the pushed version it runs (None: its local file).
            "cluster": None if getattr(node, "cluster_watch", None) is None else
            {"node": node.cluster_watch.name, "version": node.cluster_watch.applied},
        },
        "listeners": [{"key": key, "address": f"[{h}]:{p}" if ":" in h else f"{h}:{p}"}
                      for key, (h, p) in listeners(node.config)],
        "queue": {
            "active": snap.counts.get("active", 0),
            "new": snap.counts.get("new", 0),
            "deferred": snap.counts.get("deferred", 0),
            "hold": snap.counts.get("hold", 0),
            "corrupt": snap.counts.get("corrupt", 0),
            "total": snap.size,
            "oldest": snap.oldest,
            "oldest_id": snap.oldest_id or None,
        },
        "alerts": alerts,
        "maintenance": await plane.maintenance_status(),
        "balancer": balancer,
    }


def health(doc: dict[str, Any] | None) -> tuple[int, list[str]]:
    """(exit code, reasons): NOT_RUNNING without a document, DEGRADED with an active
    alert, a corrupt queue file, a failed maintenance run or a virtual server with no
    real server up; else HEALTHY."""
    if not doc or not doc.get("running"):
        return NOT_RUNNING, ["kanmon is not running"]
    from kanmon.alerts import alert_title  # noqa: PLC0415

    reasons = [f"alert {a['category']}: {alert_title(a['category'], a['key'], a['text'])}"
               for a in doc.get("alerts") or []]
    corrupt = (doc.get("queue") or {}).get("corrupt", 0)
    if corrupt:
        reasons.append(f"{corrupt} corrupt queue file(s) in spool/corrupt")
    for job in doc.get("maintenance") or []:
        if job.get("last_error"):
            reasons.append(f"maintenance {job['name']} failed: {job['last_error']}")
    for vs in doc.get("balancer") or []:
        if vs.get("serving") in (None, "none"):
            reasons.append(f"balancer {vs['name']}: no real server up")
    return (DEGRADED if reasons else HEALTHY), reasons
