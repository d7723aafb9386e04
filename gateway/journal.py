"""The gateway's accounting journal: operations on money and usage that Redis did not confirm (it was down, or a
call timed out and may or may not have been applied), kept in an append-only file under `gateway.journal_dir`
and replayed until Redis confirms them.

Every operation carries its own id and every replay goes through a script that applies an id at most once, so
an operation applied before a timeout, replayed after it, or replayed again after a crash counts once.

One file per running gateway: `<dir>/gateway-<n>.jsonl`, owned through an exclusive lock on
`<dir>/gateway-<n>.lock` (flock, released by the kernel when the process dies). A gateway that starts takes the
first free slot and adopts every unowned journal it finds (a predecessor's, a dead replica's), so nothing written
before a crash is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pathlib
import typing

from llmserve.common.logs import get_logger

log = get_logger(__name__)

Handler = typing.Callable[[dict], typing.Awaitable[None]]


class Journal:
    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        self.entries: list[dict] = []
        self.handlers: dict[str, Handler] = {}
        self.path: pathlib.Path | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._replaying = asyncio.Lock()

    def on(self, op: str, handler: Handler) -> None:
        """handler(entry) applies one entry to Redis (idempotently) or raises."""
        self.handlers[op] = handler

    # ---- files ----

    def open(self) -> Journal:
        self.dir.mkdir(parents=True, exist_ok=True)
        slot = 0
        while (fd := self._try_lock(slot)) is None:
            slot += 1
        self._lock_fd, self.path = fd, self.dir / f"gateway-{slot}.jsonl"
        self.entries = self._read(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.adopt()
        if self.entries:
            log.info("accounting journal has unconfirmed operations", path=str(self.path), count=len(self.entries))
        return self

    def _try_lock(self, slot: int) -> int | None:
        fd = os.open(self.dir / f"gateway-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def adopt(self) -> None:
        """Moves the entries of every journal no running gateway owns into this one."""
        for lock in sorted(self.dir.glob("gateway-*.lock")):
            path = lock.with_suffix(".jsonl")
            if path == self.path or not path.exists():
                continue
            fd = self._try_lock(int(lock.stem.rpartition("-")[2]))
            if fd is None:
                continue  # a running gateway owns it
            try:
                for entry in self._read(path):
                    self.append(entry)
                path.unlink()
            finally:
                os.close(fd)

    @staticmethod
    def _read(path: pathlib.Path) -> list[dict]:
        entries = []
        with contextlib.suppress(FileNotFoundError), path.open() as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line torn by a crash mid-write
                    entries.append(json.loads(line))
        return entries

    def append(self, entry: dict) -> None:
        """Durable before it returns (fsync): written once Redis failed, so rare and small."""
        assert self._fd is not None, "Journal.open() first"
        os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)
        self.entries.append(entry)

    def _rewrite(self) -> None:
        """Replaces the file with the entries still unconfirmed (write, fsync, rename: never a moment without)."""
        assert self.path is not None and self._fd is not None
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in self.entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    # ---- replay ----

    async def replay(self) -> bool:
        """Applies the entries in order until one fails; whether the journal is now empty."""
        async with self._replaying:
            return await self._replay()

    async def _replay(self) -> bool:
        if not self.entries:
            return True
        done = 0
        for entry in list(self.entries):
            try:
                await self.handlers[entry["op"]](entry)
            except Exception as exc:
                log.warning("accounting journal replay stopped; retrying later", error=type(exc).__name__,
                            left=len(self.entries) - done)
                break
            done += 1
        if done:
            del self.entries[:done]  # entries appended meanwhile stay, after the applied ones
            self._rewrite()
            log.info("accounting journal replayed", applied=done, left=len(self.entries))
        return not self.entries

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
