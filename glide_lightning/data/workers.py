"""Stop signals in DataLoader worker processes: the main process handles them, workers obey only it.

Ctrl-C, ``kill -- -PGID``, SLURM's ``scancel`` (every process of the job step) and some container
runtimes signal every process of a job, DataLoader workers included. PyTorch's workers die of
SIGTERM at once (and print a traceback each for SIGINT), after which the main process crashes on its
lost workers before :class:`~glide_lightning.callbacks.interrupt.GracefulInterrupt` can finish the
step and save. Ignoring SIGTERM outright is no answer either: it is also how the main process ends
workers that did not stop in time (the DataLoader's shutdown) or were still running when the
interpreter exits (``multiprocessing`` terminates and then joins its daemonic children, so a worker
that ignores it hangs the exit forever).

So a worker ignores SIGINT, and obeys SIGTERM only when it comes from its parent: a thread waits for
the (blocked) signal with ``sigwaitinfo``, which names the sender, and exits the worker at once with
status 0 if the sender is the parent (as PyTorch's own worker handler does, so that the parent does
not report a killed worker), else drops the signal. If the parent dies, PyTorch's worker watchdog
ends the worker.

That holds only if every other thread of the worker blocks SIGTERM, and ``worker_init_fn`` runs too
late to ensure it alone: a forked child runs the parent's at-fork hooks first, and some start threads
there, which inherit the forking thread's signal mask. wandb's OpenTelemetry metrics and logs
providers do (a periodic exporter thread and resource-detector pools), so in a process that has
started a wandb run, as ``fit`` has, each worker held two such threads with SIGTERM unblocked, and
the kernel could hand another process's SIGTERM to one of them, where PyTorch's worker handler kills
the worker. So the main process also blocks SIGTERM and SIGINT in its forking thread while the
workers are forked (:func:`stop_signals_blocked`); a signal sent to it meanwhile waits, and is taken
when the mask is restored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _obey_only_the_parent(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGINT is ignored; SIGTERM ends the worker only when the parent
    (the DataLoader's process) sends it. Run in the worker's main thread, before it starts any other
    thread (which inherit the signal mask). ``worker_id`` is unused (the ``worker_init_fn`` signature)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_only_the_parent, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent-only").start()


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGINT in the calling thread for the block, then restore its signal mask (a signal
    that arrived meanwhile is then taken). Wrap whatever forks DataLoader workers (the first ``iter`` of a
    loader with persistent workers, every ``iter`` without), so that threads the child's at-fork hooks start
    inherit the block (see the module docstring)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
