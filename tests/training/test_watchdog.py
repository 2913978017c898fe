"""The watchdog's decisions, driven by hand on a clock of the test's own (the launched runs of
test_multiprocess.py kill, stop and hang real processes): who is silent, when the step clock runs,
what the one line says, and that process 0 keeps the store up until the others have left."""

import pytest

from alexnet_jax.training import watchdog


class Store:
    """The key-value calls the watchdog makes, on a dict (the real one is jax.distributed's service)."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        return [(key, value) for key, value in self.values.items() if key.startswith(prefix)]


def _dog(index=0, count=3, store=None, **kwargs):
    clock = [100.0]
    ended = []
    dog = watchdog.Watchdog(
        client=store,
        process_index=index,
        process_count=count,
        peer_timeout_s=10,
        step_timeout_s=30,
        resume_step=lambda: 8,
        clock=lambda: clock[0],
        end=ended.append,
        **kwargs,
    )
    return dog, clock, ended


def test_a_peer_whose_pulse_stops_is_named_once_the_peer_timeout_passes():
    store = Store()
    dog, clock, _ = _dog(store=store)
    for counter in ("1", "2"):
        store.values.update({f"{watchdog.PREFIX}/pulse/1": counter, f"{watchdog.PREFIX}/pulse/2": counter})
        dog._read(store.key_value_dir_get(watchdog.PREFIX))
        clock[0] += 4
    assert dog._verdict(clock[0]) is None
    store.values[f"{watchdog.PREFIX}/pulse/2"] = "3"  # process 1 falls silent, process 2 goes on
    clock[0] += 7
    dog._read(store.key_value_dir_get(watchdog.PREFIX))
    assert dog._verdict(clock[0]) is not None and "process 1 of 3 has not answered for 11 s" in dog._verdict(clock[0])
    store.values[f"{watchdog.PREFIX}/done/1"] = "1"  # finished normally: no longer expected
    dog._read(store.key_value_dir_get(watchdog.PREFIX))
    assert dog._verdict(clock[0]) is None


def test_the_step_clock_runs_between_beats_only_and_not_while_paused():
    dog, clock, _ = _dog(count=2, store=None)
    assert dog._verdict(clock[0] + 1000) is None  # not armed before the first beat (compiling)
    dog.beat(5)
    assert dog._verdict(clock[0] + 29) is None
    assert "no training progress for 31 s after step 5" in dog._verdict(clock[0] + 31)
    with dog.paused():  # an evaluation, a checkpoint write
        assert dog._verdict(clock[0] + 1000) is None
        clock[0] += 1000
    assert dog._verdict(clock[0] + 29) is None  # the clock starts again after the pause
    dog.idle()  # the loop is over
    assert dog._verdict(clock[0] + 1000) is None


def test_a_store_that_stops_answering_means_process_0_is_gone():
    dog, clock, _ = _dog(index=1, store=Store())
    assert "coordination service (process 0) has not answered for 11 s" in dog._verdict(clock[0] + 11)


def test_the_line_says_what_happened_what_to_do_and_where_it_resumes(capsys):
    store = Store()
    dog, clock, ended = _dog(index=1, store=store)
    dog._fire("process 2 of 3 has not answered for 11 s")
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("error: process 2 of 3 has not answered for 11 s")
    assert "restart the job (the same command); it resumes from step 8, the newest complete checkpoint" in line
    assert ended == [watchdog.EXIT_LOST]
    assert store.values[f"{watchdog.PREFIX}/news"] == "1: process 2 of 3 has not answered for 11 s"
    assert store.values[f"{watchdog.PREFIX}/gone/1"] == "1"
    dog._fire("again")  # once only
    assert ended == [watchdog.EXIT_LOST]


def test_the_others_pass_the_news_on_in_their_own_line():
    store = Store()
    store.values[f"{watchdog.PREFIX}/news"] = "0: no training progress for 31 s after step 5"
    dog, clock, _ = _dog(index=2, store=store)
    dog._read(store.key_value_dir_get(watchdog.PREFIX))
    assert dog._verdict(clock[0]) == "process 0 stopped the job (no training progress for 31 s after step 5)"


def test_process_0_waits_for_the_living_others_to_leave_and_no_longer():
    store = Store()
    dog, clock, ended = _dog(index=0, store=store)
    store.values.update({f"{watchdog.PREFIX}/pulse/1": "1", f"{watchdog.PREFIX}/pulse/2": "1"})
    dog._read(store.key_value_dir_get(watchdog.PREFIX))
    assert dog._still_here() == [1, 2]
    store.values[f"{watchdog.PREFIX}/gone/1"] = "1"  # process 1 read the news and left
    dog._read(store.key_value_dir_get(watchdog.PREFIX))
    assert dog._still_here() == [2]
    clock[0] += 11  # process 2 is silent (dead): not waited for
    assert dog._still_here() == []


@pytest.mark.parametrize("resume, expected", [(None, "starts from step 0"), (12, "resumes from step 12")])
def test_the_restart_hint_names_the_step(resume, expected):
    assert expected in watchdog.restart_hint(resume)


def test_the_newest_finished_checkpoint_ignores_orbax_temporary_directories(tmp_path):
    assert watchdog.newest_checkpoint(str(tmp_path / "none")) is None
    for name in ("2", "10", "12.orbax-checkpoint-tmp-1234", "4"):
        (tmp_path / name).mkdir()
    assert watchdog.newest_checkpoint(str(tmp_path)) == 10
