"""Where the training loop's time goes: the split a heartbeat carries."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from crowdtrain.node.stats.loop_time import LoopTime, SwarmWait
from crowdtrain.protocol.messages import TimeSplit


def test_a_wait_inside_a_wait_counts_once() -> None:
    """hivemind's step may load state inside its swarm step: both are timed, once."""
    wait = SwarmWait()
    with wait.timed():
        time.sleep(0.05)
        with wait.timed():
            time.sleep(0.05)
    assert 0.1 <= wait.so_far() < 0.2
    with pytest.raises(RuntimeError), wait.timed():
        raise RuntimeError("a failed round still took the time")
    assert wait.so_far() >= 0.1
    with wait.timed():
        pass
    assert wait._depth == 0


def test_a_wait_under_way_counts_in_the_split_as_in_the_whole() -> None:
    """A heartbeat sent while the trainer waits for a long round: the wait so far is in
    the swarm's part as it is in the loop's time (counted only once the round returned,
    two reads around its end gave a window with more waiting than time)."""
    swarm, loop = SwarmWait(), LoopTime()
    with swarm.timed():
        time.sleep(0.05)  # before the loop (joining's state download): not the loop's
    loop.start(swarm)
    waiting, done = threading.Event(), threading.Event()

    def round_() -> None:
        with swarm.timed():
            waiting.set()
            done.wait()

    trainer = threading.Thread(target=round_)
    trainer.start()
    try:
        waiting.wait()
        time.sleep(0.1)
        during = loop.split()
        assert during.swarm_wait_s >= 0.1 and during.training_s >= during.swarm_wait_s
    finally:
        done.set()
        trainer.join()
    loop.stop()
    after = loop.split()
    assert after.swarm_wait_s >= during.swarm_wait_s
    assert after.swarm_wait_s <= after.training_s
    with swarm.timed():
        time.sleep(0.05)  # after the loop: not the loop's either
    assert loop.split().swarm_wait_s == after.swarm_wait_s


def test_the_split_counts_the_period_under_way_and_only_the_loops_periods() -> None:
    loop = LoopTime()
    assert loop.utilisation is None  # before the loop ran
    assert loop.split() == TimeSplit()
    loop.start()
    time.sleep(0.1)
    loop.add(computing_s=0.06, data_wait_s=0.01)
    running = loop.split()
    assert running.training_s >= 0.1  # read while the loop runs (the heartbeat's thread)
    loop.stop()
    time.sleep(0.1)  # outside the loop: not training time
    loop.start()
    loop.stop()
    stopped = loop.split()
    assert running.training_s <= stopped.training_s < 0.15
    assert (stopped.computing_s, stopped.swarm_wait_s, stopped.data_wait_s) == (0.06, 0.0, 0.01)
    assert loop.utilisation == pytest.approx(0.06 / stopped.training_s)


def test_the_split_read_from_another_thread_is_always_a_valid_payload() -> None:
    loop = LoopTime()
    done = threading.Event()

    def train() -> None:
        loop.start()
        while not done.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            loop.add(computing_s=time.perf_counter() - started)
        loop.stop()

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        for _ in range(200):
            split = loop.split()  # validated: the parts never exceed the whole
            assert split.computing_s <= split.training_s
    finally:
        done.set()
        trainer.join()


def test_a_split_whose_parts_exceed_the_whole_is_refused() -> None:
    with pytest.raises(ValidationError, match="exceed the training loop's 10.0"):
        TimeSplit(training_s=10.0, computing_s=9.0, swarm_wait_s=3.0)
    with pytest.raises(ValidationError):
        TimeSplit(training_s=-1.0)
    with pytest.raises(ValidationError):
        TimeSplit(training_s=float("inf"))
