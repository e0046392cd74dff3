"""DataLoader workers leave stop signals to the main process but obey their parent, so that a job-wide
SIGTERM saves a checkpoint and an interpreter exit with live workers does not hang (it did: CI hung
for 80 minutes after the last test passed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from glide_lightning.data.datamodule import GlideDataModule
from hang_guard import HANG_GUARD_S

sys.path.insert(0, str(Path(__file__).parent))
from test_datamodule import make_dm, train_dir  # noqa: E402, F401 (train_dir: the module's shards fixture)


def wait_until_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        time.sleep(0.05)
    return False


def wait_until_taken(pid: int, signum: int) -> None:
    """Until process ``pid`` has taken a signal sent to it (no longer pending: handled, dropped, or died of it),
    however slow the machine; the kernel queues a signal before ``kill`` returns."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except (FileNotFoundError, ProcessLookupError):
            return
        if fields["State"].strip().startswith(("Z", "X")):
            return
        if not any(int(fields[mask], 16) >> (signum - 1) & 1 for mask in ("ShdPnd", "SigPnd")):
            return
        time.sleep(0.05)
    raise AssertionError(f"signal {signum} still pending in process {pid} after {HANG_GUARD_S} s")


def test_workers_ignore_a_sigterm_from_others_and_obey_one_from_their_parent(train_dir: Path) -> None:
    dm: GlideDataModule = make_dm(train_dir, num_workers=2, samples_per_epoch=40)
    dataloader = dm.train_dataloader()
    loader = iter(dataloader)
    for _ in range(2):  # a batch from each worker (they take turns): each has started, its worker_init_fn run, however
        next(loader)    # slow the machine (a worker still starting would die of the signal below, as any process)
    workers = list(dataloader._iterator._workers)  # the worker processes (persistent: the loader keeps its iterator)
    # A SIGTERM sent by another process (as `kill -- -PGID` or scancel do) leaves the workers running...
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)
    for worker in workers:  # taken (a worker that died of it would be dying now), however slow the machine
        wait_until_taken(worker.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(w.is_alive() for w in workers)
    batches = [next(loader) for _ in range(4)]
    assert all(b["image"].shape[0] == 4 for b in batches)
    # ...one from the parent (the DataLoader's shutdown, multiprocessing's exit) ends a worker at once.
    workers[0].terminate()
    workers[0].join(timeout=HANG_GUARD_S)  # a hang guard: it ends at once, however loaded the machine
    assert workers[0].exitcode == 0
    del loader, dataloader


def test_no_worker_thread_but_the_waiting_one_can_take_a_sigterm_after_a_wandb_run(train_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """The kernel hands a process-wide SIGTERM to any thread that does not block it: in each worker only the
    thread waiting for it in sigwaitinfo may be such a thread. Threads that at-fork hooks start (wandb's
    OpenTelemetry exporters, once the process has started a wandb run, as `fit` has) were not: a job-wide SIGTERM
    killed workers at random. Checked on the threads themselves, so the race is caught every time."""
    script = tmp_path / "worker_threads.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, tempfile, threading, time
        from pathlib import Path
        import wandb
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_datamodule import make_dm
        # an at-fork hook that starts a thread, as wandb's may (they do unless WANDB_MODE is set in the environment)
        os.register_at_fork(after_in_child=lambda: threading.Thread(target=time.sleep, args=(3600,), daemon=True).start())
        run = wandb.init(mode="offline", dir=tempfile.mkdtemp(dir={str(tmp_path)!r}))  # as `fit` without an API key
        run.log({{"loss": 1.0}})  # the run stays open while the workers fork, as in `fit`
        dm = make_dm({str(train_dir)!r}, num_workers=2, samples_per_epoch=40)
        dataloader = dm.train_dataloader()
        loader = iter(dataloader)
        next(loader), next(loader)  # a batch from each worker: both have run worker_init_fn
        report = {{}}
        for worker in dataloader._iterator._workers:
            threads = []
            for task in Path(f"/proc/{{worker.pid}}/task").iterdir():
                status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
                blocks = int(status["SigBlk"], 16) >> 14 & 1  # SIGTERM is 15: bit 14
                waiting = "sigtimedwait" in (task / "wchan").read_text()
                threads.append((task.name, blocks, waiting))
            report[worker.pid] = threads
        print(json.dumps(report))
        run.finish()
    """))
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_MODE"},  # as a user's: no WANDB_MODE
           "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(tmp_path / "wandb")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)  # a hang guard, not a budget
    assert done.returncode == 0, done.stderr
    import json

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 2
    for pid, threads in report.items():
        assert len(threads) > 2, threads  # the at-fork hook's thread is there: the check checks something
        takers = [tid for tid, blocks, waiting in threads if not blocks and not waiting]
        assert not takers, f"worker {pid}: threads {takers} would take another process's SIGTERM ({threads})"
        assert sum(waiting for _, _, waiting in threads) == 1, threads


def test_the_interpreter_exits_while_workers_are_alive(train_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "exit_with_live_workers.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_datamodule import make_dm
        dm = make_dm({str(train_dir)!r}, num_workers=2, samples_per_epoch=40)
        loader = iter(dm.train_dataloader())
        next(loader)
        print("exiting with live workers", flush=True)
    """))
    # Its own session, so that a hang can be killed with the workers (which hold its output pipes).
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)  # a hang guard (a hang is forever), not a budget
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the interpreter did not exit within {HANG_GUARD_S} s: a worker ignored its parent's SIGTERM")
    assert proc.returncode == 0, err
    assert "exiting with live workers" in out
