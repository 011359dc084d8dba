"""A run's claim on its output directory: one training run writes `train.out_dir` at a time.

Rank 0 holds `OUT/.ufo-run.lock`, which names its host, boot, PID and the process's start time.
A second run that finds the lock is refused with one line naming the live run, unless the
holder is proven gone: on the same host, its PID no longer runs or now belongs to a process
started at another time (or the host rebooted); on another host, the holder stopped refreshing
the lock's time for `STALE_AFTER` seconds (it refreshes every `REFRESH`). So a killed run never
blocks a rerun, a requeued job included, and two live ones never write the same checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from ufo.errors import UfoError
from ufo.supervise import process_start

LOCK = ".ufo-run.lock"
REFRESH = 30.0  # seconds between the holder's touches of the lock
STALE_AFTER = 300.0  # a lock of another host untouched this long: its holder is gone


class RunDirBusy(UfoError):
    pass


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _me() -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": process_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_gone(holder: dict, age: float) -> bool:
    """Whether the run a lock names is proven gone (`age`: seconds since the lock was last refreshed)."""
    if holder.get("host") != socket.gethostname():
        return age > STALE_AFTER
    if holder.get("boot") != _boot_id():
        return True
    pid = holder.get("pid")
    if pid == os.getpid():  # this process's own earlier run, which did not get to release it
        return True
    return not isinstance(pid, int) or process_start(pid) != holder.get("start")


class RunLock:
    """Held by rank 0 while a run trains; `acquire` refuses a directory another live run holds."""

    def __init__(self, out: Path):
        self.file = out / LOCK
        self.held = False
        self._done = threading.Event()

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps(_me())
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            threading.Thread(target=self._refresh, name="ufo-run-lock", daemon=True).start()
            return
        raise RunDirBusy(f"{self.file}: could not be taken (another run keeps replacing it)")

    def _take_if_stale(self) -> None:
        try:
            text = self.file.read_text()
            age = time.time() - self.file.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
            holder = holder if isinstance(holder, dict) else {}
        except ValueError:
            holder = {}
        if holder and not holder_gone(holder, age):
            raise RunDirBusy(
                f"{self.file.parent}: another run trains here (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"since {holder.get('since')}); stop it, or give this run another train.out_dir")
        if not holder and age < STALE_AFTER:  # a holder between creating and writing its lock
            raise RunDirBusy(f"{self.file.parent}: another run is starting here ({self.file} is being written); "
                             "give this run another train.out_dir")
        stale = self.file.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.replace(self.file, stale)  # only one of several runs taking over renames it away
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def _refresh(self) -> None:
        while not self._done.wait(REFRESH):
            try:
                os.utime(self.file)
            except OSError:
                pass  # a lost refresh only makes the lock look older to another host

    def release(self) -> None:
        """Give the directory back (only a lock this process holds)."""
        self._done.set()
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
        except (OSError, ValueError, AttributeError):
            pass
