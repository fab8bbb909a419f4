"""Stopping a training run cleanly on SIGINT/SIGTERM (Ctrl-C, a batch system's notice)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from .. import distributed
from ..errors import TrainingInterrupted


class StopOnSignal:
    """SIGINT/SIGTERM handlers (main thread only) that ask the training loop to stop after the current step.

    A second signal stops at once by raising :class:`TrainingInterrupted` wherever the loop is
    (checkpoint writes are atomic, so the last checkpoint stays intact). The previous handlers
    are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, resume_hint: str, escalate: bool = True) -> None:
        self.signum: Optional[int] = None
        self.resume_hint = resume_hint
        # Under torchrun a Ctrl-C reaches each worker twice (from the terminal and forwarded by the agent),
        # so there a repeated signal does not escalate; the agent kills workers that do not stop in time.
        self.escalate = escalate
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, info: distributed.DistInfo, device: torch.device) -> bool:
        """Whether any rank got a signal (under torchrun a collective that every rank calls); a rank that got none
        takes the other's, so that every rank stops, and says why, alike (a signal may reach one rank only: one
        node of a job preempted, a kill of one process)."""
        signum = distributed.largest(self.signum or 0, info, device)
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)

    def saved(self) -> None:
        """The state is saved and the loop is on its way out: a further signal no longer stops it at once (whose
        message would say the state was not saved)."""
        self.escalate = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and not self.escalate:
            return
        if self.signum is not None:
            raise TrainingInterrupted(f"interrupted again ({name}): stopped at once without saving the current "
                                      f"step; the last checkpoint is intact; {self.resume_hint}", signum)
        self.signum = signum
        # os.write, not print: a handler may run in the middle of a print to the same stream.
        os.write(2, f"iaat: {name} received; stopping after the current step or evaluation batch, with the state "
                    f"saved (send it again to stop at "
                    f"once)\n".encode())
