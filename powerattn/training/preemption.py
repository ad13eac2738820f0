"""Graceful stops: SIGTERM / SIGUSR1 (SLURM preemption, torchrun forwarding SIGTERM) or a `STOP` file
in the run folder ask the run to checkpoint at the end of the current step and exit 0.

The file exists for launchers that cannot reach the workers with a signal (a SLURM batch script
traps its own signal and touches `<output_dir>/STOP`); any one rank seeing a request stops all.
"""

from __future__ import annotations

import signal
from pathlib import Path

from powerattn.training.distributed import Dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, stop_file: Path, received: list[int] | tuple[int, ...] = ()):
        """received: signals that arrived before this existed (train.py catches them from its first line)."""
        self.stop_file = stop_file
        self.reason: str | None = signal.Signals(received[0]).name if received else None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self, dist: Dist) -> bool:
        """Collective: whether any rank got a signal or sees the stop file."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"{self.stop_file.name} file"
        return dist.any(self.reason is not None)

    def clear(self, dist: Dist) -> None:
        """Remove the stop file (rank 0) so the resumed run does not stop at once."""
        if dist.is_main:
            self.stop_file.unlink(missing_ok=True)
