"""Stopping a run on a signal without losing the epoch in progress.

`on_signals` installs handlers for SIGINT (Ctrl-C) and SIGTERM. The first
signal only asks the training loop to stop: the epoch in progress finishes,
its state is saved, and the loop raises `Stopped`, which the command line
turns into exit status 130 (SIGINT) or 143 (SIGTERM). The handlers then give
both signals back to the operating system, so a second one stops the process
at once (an XLA call cannot be interrupted from Python); the epochs saved
before it are kept.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
  """Which signal asked the run to stop: ``signum`` is None until one does."""

  def __init__(self) -> None:
    self.signum: Optional[int] = None

  def __call__(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    """The signal handler: remember the first signal, then let the next one kill."""
    self.signum = signum
    for s in SIGNALS:
      signal.signal(s, signal.SIG_DFL)
    print(f"{signal_name(signum)}: stopping after the epoch in progress, which is "
          "then saved (send it again to stop at once)", file=sys.stderr, flush=True)


class Stopped(BaseException):
  """A signal stopped the run between epochs, after saving (see `on_signals`).

  A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on
  the way swallows it.

  Attributes:
    signum: the signal, ``signal.SIGINT`` or ``signal.SIGTERM``.
    status: the exit status for it, 128 + signum (130, 143).
  """

  def __init__(self, signum: int, message: str) -> None:
    super().__init__(message)
    self.signum = signum
    self.status = 128 + signum


@contextlib.contextmanager
def on_signals() -> Iterator[StopRequest]:
  """Within the block, the first SIGINT or SIGTERM sets the yielded request's ``signum``.

  The previous handlers come back when the block ends. Off the main thread,
  where Python allows no handlers, nothing is installed and the request stays
  empty.
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.signal(s, request) for s in SIGNALS}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def signal_name(signum: int) -> str:
  """``"SIGINT"`` for ``signal.SIGINT``, and so on."""
  return signal.Signals(signum).name
