"""How a rank learns that its job is ending: signals, a stop file, and the launchers above it.

A rank stops (checkpoint, then exit 3) when any of these happens, on any rank (the loop takes the
maximum over ranks every step, so one rank's stop stops all):

- it receives SIGTERM or SIGUSR1 (Slurm's warning before preemption or the time limit; srun and
  scancel signal every rank directly);
- the file `UFO_STOP_FILE` names appears: `launch/train.sh` writes it when it is signalled, so
  whichever launcher runs below it, the ranks stop in their own time instead of at the
  launcher's grace (torchrun and DeepSpeed's launcher kill their ranks 30 s after passing a
  signal on);
- a launcher above it (DeepSpeed's runner or `deepspeed.launcher.launch`, torchrun, or
  `launch/train.sh`) is gone: DeepSpeed's runner dies on SIGTERM without telling its ranks, which
  would otherwise train on, orphaned, while the job looks dead.

A rank stopped this way writes "3" to `UFO_EXIT_FILE` (when set) after its checkpoint, so the
launch script can exit 3 ("checkpoint written, rerun to resume") whatever the launcher reports.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

# command-line fragments of the processes that launch ranks
LAUNCHERS = ("deepspeed", "torch.distributed.run", "torchrun", "launch/train.sh")
STOPPED = 3  # the exit status of a rank that checkpointed on a signal


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a process, or None where it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19])


def process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot), or None where it is gone: with its PID, this
    names one process for good, where a PID alone may be reused."""
    stat = _stat(pid)
    return stat[1] if stat else None


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, int, str]]:
    """The launchers above this process: (pid, start time, command line) of each ancestor, from the
    parent up, as long as they are launchers (a shell or an init above them is not watched)."""
    found = []
    here = _stat(pid or os.getpid())
    while here is not None and here[0] > 1:
        parent = here[0]
        line = _cmdline(parent)
        stat = _stat(parent)
        if stat is None or not any(name in line for name in LAUNCHERS):
            break
        found.append((parent, stat[1], line))
        here = stat
    return found


class Stop:
    """Signals, the stop file and the launchers above, as one `received` signal number (or None).

    The watch runs in a daemon thread, once a second; signals are taken in the main thread."""

    def __init__(self, poll: float = 1.0):
        self.received: int | None = None
        self.reason = ""
        self._old: dict = {}
        self._poll = poll
        self._done = threading.Event()
        self._file = os.environ.get("UFO_STOP_FILE")
        self._launchers = launcher_ancestors()

    def __enter__(self) -> "Stop":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, name="ufo-stop-watch", daemon=True).start()
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.reason = signal.Signals(signum).name

    def _watch(self) -> None:
        while not self._done.wait(self._poll):
            if self.received is not None:
                continue
            if self._file and os.path.exists(self._file):
                self.reason = f"{Path(self._file).read_text().strip() or 'a signal'} to the launch script"
                self.received = signal.SIGTERM
            for pid, start, line in self._launchers:
                stat = _stat(pid)
                if stat is None or stat[1] != start:
                    self.reason = f"launcher {pid} ({line.split()[0] if line else '?'}...) gone"
                    self.received = signal.SIGTERM
                    break

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def report_stopped() -> None:
    """Tell the launch script (`UFO_EXIT_FILE`) that this rank checkpointed and stopped on a signal."""
    file = os.environ.get("UFO_EXIT_FILE")
    if file:
        try:
            Path(file).write_text(f"{STOPPED}\n")
        except OSError:
            pass  # the status is a courtesy; the checkpoint is written


# what gloo and NCCL say when a peer is gone or silent past the collective timeout
_PEER_LOST = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
              "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def peer_lost(error: BaseException) -> bool:
    """Whether an error raised by a collective means another rank is hung, stopped, cut off or dead."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_LOST)
