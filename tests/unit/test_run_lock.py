"""The run lock: one live run per run directory; a lock left by a dead process blocks nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from tests.conftest import REPO

from sparring.cli import main
from sparring.state import RunDir, RunLock, RunLocked

# Holds the lock of argv[1] through the same API as a run, says so, then waits to be killed.
HOLDER = "import sys, time; from sparring.state import RunDir; RunDir(sys.argv[1]).lock(); print('held', flush=True); time.sleep(120)"
TRY = "import sys; from sparring.state import RunDir, RunLocked\ntry:\n RunDir(sys.argv[1]).lock()\nexcept RunLocked:\n sys.exit(3)"


def python(code: str, *args: str, **kw):
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def holder(tmp_path):
    """A live process holding tmp_path/run; killed (SIGKILL) at the end if the test has not."""
    proc = python(HOLDER, str(tmp_path / "run"))
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_on_a_held_directory_refuses_at_once_naming_the_holder(holder, tmp_path, capsys):
    run = tmp_path / "run"
    started = time.monotonic()
    code = main(["run", str(REPO / "configs" / "spin" / "tiny.yaml"), f"output_dir={run}"])
    assert code == 2 and time.monotonic() - started < 30  # refused before any model or data is loaded
    err = capsys.readouterr().err
    body = json.loads((run / ".lock").read_text())
    assert body["pid"] == holder.pid and body["host"] == socket.gethostname()
    assert f"is in use by another run (host {body['host']}, PID {holder.pid}, started {body['started']})" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the run was written


def test_lock_of_a_sigkilled_process_does_not_block_the_rerun(holder, tmp_path):
    run = tmp_path / "run"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # its file is left behind
    lock = RunDir(run).lock()  # the kernel dropped the dead process's flock
    try:
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_lock_is_held_until_released_and_a_rerun_in_the_same_process_takes_it_over(tmp_path):
    run = tmp_path / "run"
    RunDir(run).lock()
    RunDir(run).lock()  # an earlier run in this process (ended or failed) never blocks the next
    assert python(TRY, str(run)).wait(timeout=60) == 3  # another process is refused
    RunLock.release_all()  # what the CLI does when a run returns or raises
    assert python(TRY, str(run)).wait(timeout=60) == 0


def test_holder_that_has_not_written_its_details_yet_is_still_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    bare = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    proc = python(bare, str(run / ".lock"))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=r"in use by another run \(holder details not written yet\)"):
            RunDir(run).lock()
        RunDir(tmp_path / "other").lock().release()  # another directory is independent
    finally:
        proc.kill()
        proc.wait()
