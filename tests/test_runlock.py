"""A run's claim on its out_dir (ufo/runlock.py): refused while its holder lives, taken once it is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from ufo.runlock import LOCK, STALE_AFTER, RunDirBusy, RunLock, _boot_id
from ufo.supervise import process_start


def holder(pid: int, host: str | None = None) -> dict:
    return {"host": host or socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": process_start(pid),
            "since": "then"}


def test_a_live_holder_is_refused_and_a_released_lock_is_free(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / LOCK).write_text(json.dumps(holder(other.pid)))  # a live run of this host
        with pytest.raises(RunDirBusy, match=f"another run trains here .*pid {other.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    second = RunLock(tmp_path)
    second.acquire()  # its holder is gone now: taken over
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    second.release()
    first.release()  # the lock is no longer its own: left alone
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_does_not_keep_a_dead_run_alive(tmp_path):
    dead = holder(os.getpid())
    dead["start"] -= 1  # this PID, but a process started at another time: the holder is gone
    (tmp_path / LOCK).write_text(json.dumps(dead))
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_another_hosts_lock_holds_until_it_goes_stale(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps(holder(1, host="elsewhere")))
    with pytest.raises(RunDirBusy, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(tmp_path / LOCK, (old, old))  # its holder stopped refreshing it
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
