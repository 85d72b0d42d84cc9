"""Files the console moves for the queue backup and restore: where they are kept while
they cross the connection, and how an upload is taken with a bound.

Role: a private directory <data_dir>/console/transfer (0700; files 0600) holds an archive
the node wrote for a download until it is sent, and an uploaded archive until the restore
has read it; both are removed then, and anything older than a day (a crash in between)
at the next use. `receive` copies an upload into a new file there, refusing it past
`limit` bytes (it never grows past the bound on disk).

Trusts: nothing in an upload: it is only counted and written; the restore reads it with
the strict archive decoder (kanmon.admin.backup). Names are made here, never taken from
the client.
Never: keep a file readable by others, or keep writing an upload past its bound.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

STALE = 86400.0  # seconds: a transfer file this old was left by a crash
CHUNK = 1 << 20


class TooLarge(Exception):
    """The upload is larger than the bound."""


def transfer_dir(data_dir: Path | str) -> Path:
    d = Path(data_dir) / "console" / "transfer"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def sweep(directory: Path, now: float | None = None) -> None:
    """Remove transfer files left by a crash (older than STALE)."""
    now = time.time() if now is None else now
    for f in directory.iterdir():
        try:
            if now - f.stat().st_mtime > STALE:
                f.unlink()
        except OSError:
            pass


def new_path(data_dir: Path | str, kind: str) -> Path:
    """A fresh, unused name for a transfer file (the file is not created)."""
    d = transfer_dir(data_dir)
    sweep(d)
    return d / f"{kind}-{int(time.time())}-{secrets.token_hex(8)}.tar"


async def receive(chunks: AsyncIterator[bytes], path: Path, limit: int) -> int:
    """Write the chunks to a new private file; TooLarge (and no file) past `limit` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the upload is larger than {limit} bytes")
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


async def upload_chunks(upload) -> AsyncIterator[bytes]:
    """The content of a Starlette UploadFile, a chunk at a time."""
    while True:
        chunk = await upload.read(CHUNK)
        if not chunk:
            return
        yield chunk
