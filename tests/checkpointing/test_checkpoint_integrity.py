"""Verified checkpoints and failing storage, with real Orbax saves on real file systems.

Damage is done to the files on disk as storage does it (bytes overwritten, a file
cut short or gone); a full disk is a real size-limited tmpfs.
"""

import gc
import glob
import hashlib
import json
import logging
import os
import re
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.checkpointing import manifest
from alexnet_jax.checkpointing.checkpoint import Checkpointer
from alexnet_jax.checkpointing.manifest import MANIFEST_NAME
from alexnet_jax.checkpointing.storage import StorageError
from alexnet_jax.errors import UserError

META = {"model": "paper", "num_classes": 3, "optimizer": "sgd"}


# A restore that Orbax abandons leaves coroutines it never awaited; collect them here, not in a later test.
_ORBAX_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int, big: int = 262_144) -> dict:
    """A few arrays, the largest `big` float32s (1 MB by default) of incompressible noise."""
    rng = np.random.default_rng(seed)
    return {
        "conv": jnp.asarray(rng.standard_normal((big,), dtype=np.float32)),
        "fc": jnp.asarray(rng.standard_normal((64, 512), dtype=np.float32)),
        "bias": jnp.asarray(rng.standard_normal((10,), dtype=np.float32)),
        "step": jnp.int32(seed),
    }


def _save(workdir, *steps: int, big: int = 262_144) -> dict[int, dict]:
    checkpointer = Checkpointer(str(workdir))
    states = {step: _state(step, big) for step in steps}
    for step, state in states.items():
        checkpointer.save(step, state, META)
    checkpointer.close()
    return states


def _assert_bitwise_equal(restored: dict, expected: dict) -> None:
    assert restored.keys() == expected.keys()
    for key in expected:
        a, b = np.asarray(restored[key]), np.asarray(expected[key])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key


def _largest_file(step_dir) -> str:
    files = [p for p in glob.glob(f"{step_dir}/**/*", recursive=True) if os.path.isfile(p)]
    return max((p for p in files if not p.endswith(MANIFEST_NAME)), key=os.path.getsize)


def _overwrite_middle(path: str, count: int = 4096) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2 - count // 2)
        handle.write(np.random.default_rng(7).bytes(count))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _set_aside(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".corrupt-" in name)


def test_every_finished_save_carries_a_manifest_of_its_files(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(1, _state(1), META)
    checkpointer._manager.wait_until_finished()  # Orbax alone: the manifest came with the commit
    step_dir = tmp_path / "checkpoints" / "1"
    assert (step_dir / MANIFEST_NAME).exists()
    checkpointer.close()
    record = json.loads((step_dir / MANIFEST_NAME).read_text())
    assert record["format"] == 1 and record["step"] == 1 and record["algorithm"] == "sha256"
    on_disk = {
        os.path.relpath(path, step_dir)
        for path in glob.glob(f"{step_dir}/**/*", recursive=True)
        if os.path.isfile(path)
    }
    # All files but the manifest and the commit records Orbax rewrites after it.
    assert set(record["files"]) == on_disk - {MANIFEST_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert any(name.startswith("state/") for name in record["files"]) and "meta/metadata" in record["files"]
    for name, entry in record["files"].items():
        data = (step_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest.verify_step(str(step_dir)) == manifest.Verdict(manifest=True)


def test_only_the_primary_process_writes_manifests(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), is_primary=False)
    checkpointer.save(1, _state(1), META)
    checkpointer.close()
    assert not (tmp_path / "checkpoints" / "1" / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_overwrite_middle, "does not match its sha256 in the manifest"),
        (_truncate, r"has \d+ bytes, the manifest says \d+"),
        (os.remove, "is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restores(tmp_path, caplog, damage, problem):
    states = _save(tmp_path, 1, 2)
    directory = tmp_path / "checkpoints"
    damaged = _largest_file(directory / "2")
    damage(damaged)
    checkpointer = Checkpointer(str(tmp_path))  # as the restarted run sees it
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.checkpointing.checkpoint"):
        step, restored = checkpointer.restore_verified(states[1])
    assert step == 1
    _assert_bitwise_equal(restored, states[1])
    [aside] = _set_aside(directory)
    assert aside.startswith("2.corrupt-") and sorted(os.listdir(directory / aside)) == sorted(
        os.listdir(directory / "1")
    )  # moved, not deleted
    assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    relative = os.path.relpath(damaged, directory / "2")
    where = f"checkpoint 2 in {directory} is damaged: {relative} "
    assert re.search(re.escape(where) + problem, warning), warning
    assert aside in warning
    checkpointer.save(3, states[1], META)  # the run goes on beside the set-aside step
    checkpointer.close()
    assert Checkpointer(str(tmp_path)).all_steps() == [1, 3]


def test_a_checkpoint_without_a_manifest_restores_with_a_note(tmp_path, caplog):
    states = _save(tmp_path, 4)
    os.remove(tmp_path / "checkpoints" / "4" / MANIFEST_NAME)  # as saved before manifests existed
    with caplog.at_level(logging.INFO, logger="alexnet_jax.checkpointing.checkpoint"):
        step, restored = Checkpointer(str(tmp_path)).restore_verified(states[4])
    assert step == 4
    _assert_bitwise_equal(restored, states[4])
    assert any(
        r.levelno == logging.INFO and "checkpoint 4" in r.getMessage() and "has no manifest" in r.getMessage()
        for r in caplog.records
    )


@_ORBAX_LEFTOVERS
def test_a_checkpoint_orbax_cannot_read_is_damage_too_without_a_manifest(tmp_path, caplog):
    states = _save(tmp_path, 1, 2)
    step_dir = tmp_path / "checkpoints" / "2"
    os.remove(step_dir / MANIFEST_NAME)
    _truncate(_largest_file(step_dir))
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.checkpointing.checkpoint"):
        step, restored = Checkpointer(str(tmp_path)).restore_verified(states[1])
    assert step == 1
    _assert_bitwise_equal(restored, states[1])
    assert [name[:10] for name in _set_aside(tmp_path / "checkpoints")] == ["2.corrupt-"]
    assert any("checkpoint 2" in r.getMessage() and "Orbax could not read it" in r.getMessage() for r in caplog.records)
    gc.collect()


def test_a_target_that_does_not_fit_a_verified_checkpoint_is_not_called_damage(tmp_path):
    states = _save(tmp_path, 1)
    wrong = {key: value for key, value in states[1].items() if key != "bias"}  # another model's state, say
    with pytest.raises(ValueError, match="tree structures do not match"):
        Checkpointer(str(tmp_path)).restore_verified(wrong)
    assert _set_aside(tmp_path / "checkpoints") == []


def test_with_every_checkpoint_damaged_restore_refuses_in_one_line(tmp_path):
    states = _save(tmp_path, 1, 2)
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        _overwrite_middle(_largest_file(directory / str(step)))
    with pytest.raises(UserError, match="no intact checkpoint left") as refused:
        Checkpointer(str(tmp_path)).restore_verified(states[1])
    message = str(refused.value)
    assert "\n" not in message
    aside = _set_aside(directory)
    assert [name[:10] for name in aside] == ["1.corrupt-", "2.corrupt-"]
    assert all(name in message for name in aside) and "another --workdir" in message
    # The next launch does not quietly start over beside them.
    with pytest.raises(UserError, match="no intact checkpoint left"):
        Checkpointer(str(tmp_path)).latest_intact_step()


def test_an_empty_workdir_has_nothing_to_restore(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    assert checkpointer.latest_intact_step() is None
    assert checkpointer.restore_verified(_state(0)) is None
    checkpointer.close()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs: a real file system that fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, timeout=30
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], capture_output=True, timeout=30)
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


@pytest.mark.parametrize("surfaces_at", ["wait", "next save"])
def test_a_save_that_runs_out_of_space_stops_with_one_line_and_leaves_no_partial_step(small_disk, caplog, surfaces_at):
    workdir = small_disk / "run"
    checkpointer = Checkpointer(str(workdir))
    first = _state(1)  # 1.2 MB
    checkpointer.save(1, first, META)
    checkpointer.wait()
    too_big = _state(2, big=2_000_000)  # 8.1 MB: more than the disk has left
    with caplog.at_level(logging.INFO), pytest.raises(StorageError) as failed:
        checkpointer.save(2, too_big, META)  # the write is asynchronous: its failure comes later
        if surfaces_at == "wait":
            checkpointer.wait()
        else:
            checkpointer.save(3, first, META)
    checkpointer.close()  # and is not raised a second time
    message = str(failed.value)
    assert isinstance(failed.value, UserError) and "\n" not in message
    directory = workdir / "checkpoints"
    assert f"could not write checkpoint 2 to {directory}: No space left on device" in message
    assert " free there, one checkpoint needs about 8.1 MB" in message and "resume from step 1" in message
    assert sorted(os.listdir(directory)) == ["1"]  # the half-written step is gone
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no Orbax tracebacks besides it
    step, restored = Checkpointer(str(workdir)).restore_verified(first)
    assert step == 1
    _assert_bitwise_equal(restored, first)


def test_a_read_only_checkpoint_directory_fails_before_orbax_starts(small_disk):
    workdir = small_disk / "run"
    checkpointer = Checkpointer(str(workdir))
    checkpointer.save(1, _state(1), META)
    checkpointer.wait()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    with pytest.raises(StorageError, match=r"could not write checkpoint 2 .*: Read-only file system; .* free there"):
        checkpointer.save(2, _state(2), META)
    checkpointer.close()
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True, timeout=30)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


def test_free_space_is_checked_at_start_up(small_disk, caplog):
    checkpointer = Checkpointer(str(small_disk / "run"), keep=3)
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.checkpointing.checkpoint"):
        assert checkpointer.check_free_space(_state(0, big=10_000))  # 5 x 0.17 MB fit in 8 MB
        assert not checkpointer.check_free_space(_state(0, big=500_000))  # 5 x 2.1 MB do not
    checkpointer.close()
    [warning] = [r.getMessage() for r in caplog.records]
    assert "less than the 10.7 MB that 5 more checkpoints of 2.1 MB need" in warning
