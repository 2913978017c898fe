"""One writer per workdir: real lock files, real second processes, real SIGKILL."""

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

from alexnet_jax.checkpointing import workdir_lock
from alexnet_jax.checkpointing.workdir_lock import LOCK_NAME, Holder, WorkdirLock
from alexnet_jax.errors import UserError

TIMEOUT_S = 60


def _python(script: str, *args: str):
    """A fresh interpreter running `script` with this checkout's package on its path."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return [sys.executable, "-c", textwrap.dedent(script), *args], env


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command, env = _python(script, *args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


TRY_ACQUIRE = """
    import sys
    from alexnet_jax.errors import UserError
    from alexnet_jax.checkpointing.workdir_lock import WorkdirLock
    try:
        WorkdirLock(sys.argv[1]).acquire()
    except UserError as error:
        print(error)
        sys.exit(2)
    print("acquired")
"""

HOLD = """
    import sys, time
    from alexnet_jax.checkpointing.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(workdir, seconds: float = 60) -> subprocess.Popen:
    command, env = _python(HOLD, str(workdir), str(seconds))
    holder = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # blocks until the lock is taken (or the child died)
    assert line.strip() == "held", line
    return holder


def _write_lock(workdir, *, age_s: float = 0.0, **fields) -> str:
    """A lock file as another run would have left it, with its heartbeat `age_s` old."""
    os.makedirs(workdir, exist_ok=True)
    holder = Holder.here("f" * 32)
    record = dataclasses.asdict(dataclasses.replace(holder, **fields))
    path = os.path.join(workdir, LOCK_NAME)
    with open(path, "w") as handle:
        json.dump(record, handle)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _token(path) -> str:
    with open(path) as handle:
        return json.load(handle)["token"]


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(str(workdir)) as lock:
        assert lock.held
        with open(workdir / LOCK_NAME) as handle:
            record = json.load(handle)
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["started"] and record["started_epoch"] <= time.time() and len(record["token"]) == 32
        assert "heartbeat" in record
        assert sorted(os.listdir(workdir)) == [LOCK_NAME]  # no temporary files left behind
    assert not lock.held and not (workdir / LOCK_NAME).exists()
    lock.release()  # idempotent
    with WorkdirLock(str(workdir)):  # and it can be taken again
        pass


def test_a_second_run_in_another_process_is_refused_with_one_line(tmp_path):
    with WorkdirLock(str(tmp_path)):
        started = workdir_lock.read_holder(str(tmp_path)).started
        result = _run(TRY_ACQUIRE, str(tmp_path))
    assert result.returncode == 2, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message
    assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
    assert f"started {started}" in message
    assert "wait for it to finish, stop it, or use another --workdir" in message
    assert _run(TRY_ACQUIRE, str(tmp_path)).stdout.strip() == "acquired"  # released: free again


def test_a_lock_held_by_another_process_is_refused_here(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"pid {holder.pid}, started "):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT_S)


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=TIMEOUT_S)
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL leaves it behind
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)) as lock:
        assert _token(tmp_path / LOCK_NAME) == lock._token
    [warning] = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert f"pid {holder.pid}" in warning and f"process {holder.pid} no longer exists" in warning


def test_a_run_that_exits_without_releasing_leaves_no_lock(tmp_path):
    result = _run(
        """
        import sys
        from alexnet_jax.checkpointing.workdir_lock import WorkdirLock
        WorkdirLock(sys.argv[1]).acquire()  # never released: atexit does it
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_is_old(tmp_path, caplog):
    _write_lock(tmp_path, host="elsewhere", pid=1234, age_s=60)
    with pytest.raises(UserError, match=r"host elsewhere, pid 1234, .*heartbeat 60 s ago") as refused:
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
    assert "\n" not in str(refused.value)

    _write_lock(tmp_path, host="elsewhere", pid=1234, age_s=601)
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path), stale_after_s=600) as lock:
        assert _token(tmp_path / LOCK_NAME) == lock._token
    assert any("no heartbeat for 601 s (limit 600 s)" in r.getMessage() for r in caplog.records)


def test_a_reused_pid_or_a_restarted_machine_does_not_keep_a_lock(tmp_path, caplog):
    """Same host: the pid alone is not enough (containers reuse small pids after a restart)."""
    ours = Holder.here("x")
    _write_lock(tmp_path, pid=os.getpid(), proc_start_ticks=ours.proc_start_ticks - 100)
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)):
        pass
    assert any(f"pid {os.getpid()} now belongs to another process" in r.getMessage() for r in caplog.records)

    _write_lock(tmp_path, pid=os.getpid(), boot_id="another-boot")
    with WorkdirLock(str(tmp_path)):
        pass
    assert any("its machine has restarted since" in r.getMessage() for r in caplog.records)


def test_a_container_on_the_same_host_counts_as_another_machine(tmp_path):
    """Its pids mean nothing here: only its heartbeat can tell that it is gone."""
    _write_lock(tmp_path, pid=99_999_999, pid_namespace="pid:[1]", age_s=10)
    with pytest.raises(UserError, match="pid 99999999"):
        WorkdirLock(str(tmp_path)).acquire()
    with WorkdirLock(str(tmp_path), stale_after_s=5):
        pass


def test_an_unreadable_lock_file_is_refused_until_it_goes_silent(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "half-writ')
    with pytest.raises(UserError, match="an unknown run"):
        WorkdirLock(str(tmp_path)).acquire()
    os.utime(path, (time.time() - 700, time.time() - 700))
    with WorkdirLock(str(tmp_path)):
        pass


def test_the_heartbeat_refreshes_the_mtime(tmp_path):
    with WorkdirLock(str(tmp_path), heartbeat_s=0.05):
        path = tmp_path / LOCK_NAME
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 10
        while time.time() - os.stat(path).st_mtime > 100 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - os.stat(path).st_mtime < 100


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path, caplog):
    first = WorkdirLock(str(tmp_path), heartbeat_s=0.05).acquire()
    os.unlink(tmp_path / LOCK_NAME)  # as a takeover does, after judging `first` gone
    second = WorkdirLock(str(tmp_path)).acquire()
    deadline = time.time() + 10
    while first._lost is None and time.time() < deadline:  # the heartbeat notices
        time.sleep(0.02)
    with pytest.raises(UserError, match=rf"taken over by another run \(host .*pid {os.getpid()}"):
        first.check()
    with caplog.at_level(logging.WARNING):
        first.release()
    assert _token(tmp_path / LOCK_NAME) == second._token
    assert any("left" in r.getMessage() and "now belongs to" in r.getMessage() for r in caplog.records)
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_process_zero_takes_the_lock(tmp_path):
    with WorkdirLock(str(tmp_path), process_index=0):
        with WorkdirLock(str(tmp_path), process_index=1) as other:  # shares process 0's lock
            assert not other.held
            other.check()
        assert (tmp_path / LOCK_NAME).exists()


def test_runs_racing_for_a_stale_lock_leave_exactly_one_winner(tmp_path):
    workdir, tried = tmp_path / "run", tmp_path / "tried"
    tried.mkdir()
    _write_lock(workdir, host="elsewhere", age_s=10_000)
    start_at = time.time() + 2.0  # all children are up by then and try at the same instant
    script = """
        import os, sys, time
        from alexnet_jax.errors import UserError
        from alexnet_jax.checkpointing.workdir_lock import WorkdirLock
        workdir, tried, start_at, runs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
        time.sleep(max(0.0, start_at - time.time()))
        try:
            lock = WorkdirLock(workdir).acquire()
        except UserError:
            print("refused")
            open(os.path.join(tried, str(os.getpid())), "w").close()
        else:
            print("won", flush=True)
            deadline = time.time() + 50
            while len(os.listdir(tried)) < runs - 1 and time.time() < deadline:  # hold it until all have tried
                time.sleep(0.05)
            lock.release()
    """
    runs = 4
    children = []
    for _ in range(runs):
        command, env = _python(script, str(workdir), str(tried), str(start_at), str(runs))
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outcomes = [child.communicate(timeout=TIMEOUT_S)[0].strip() for child in children]
    assert sorted(outcomes) == ["refused"] * (runs - 1) + ["won"], outcomes
    assert os.listdir(workdir) == []  # the lock released; no set-aside or temporary files either
