"""The sweep's figures from two reads of the peers view, the nodes' logs and the
evaluations; and the link rates it picks from the calibrated compute time."""

from __future__ import annotations

import pytest

from lab.sweep import Calibration, SweepConfig, series, spec
from lab.sweep_figures import (
    RunFigures,
    Snapshot,
    bytes_table,
    peer_figures,
    run_table,
    val_at_tokens,
    window_counts,
)


def _peer(name: str, num_tokens: int, averaging_sent: int, step: int) -> dict:
    traffic = {p: {"sent": 0, "received": 0} for p in ("averaging", "state", "control", "data")}
    traffic["averaging"] = {"sent": averaging_sent, "received": 2 * averaging_sent}
    return {"name": name, "num_tokens": num_tokens, "step": step, "traffic": traffic}


def test_a_peer_is_measured_between_the_two_reads() -> None:
    before = Snapshot.of(100.0, [_peer("node-1", 1_000, 500, 2)])
    after = Snapshot.of(110.0, [_peer("node-1", 5_000, 1_500, 4)])
    figures = peer_figures("node-1", before, after, compute_rate=500.0, rounds=(2, 1))
    assert figures.tokens_per_s == pytest.approx(400.0)
    assert figures.utilisation == pytest.approx(0.8)  # 400 of the calibrated 500 tokens/s
    assert figures.bytes_sent["averaging"] == 1_000
    assert figures.bytes_received["averaging"] == 2_000
    assert figures.bytes_sent["data"] == 0
    assert (figures.rounds_averaged, figures.rounds_failed, figures.step) == (2, 1, 4)


def test_the_nodes_own_count_of_their_time_is_taken_in_the_window() -> None:
    """Each heartbeat carries where the node's training loop spent its time since it
    started: the window's shares are the differences between the two reads."""

    def timed(training_s: float, computing_s: float, swarm_wait_s: float) -> dict:
        split = {"training_s": training_s, "computing_s": computing_s}
        return {**_peer("node-1", 0, 0, 0), "loop_time": {**split, "swarm_wait_s": swarm_wait_s}}

    before = Snapshot.of(0.0, [timed(100.0, 90.0, 5.0)])
    after = Snapshot.of(10.0, [timed(120.0, 95.0, 20.0)])
    figures = peer_figures("node-1", before, after, None, (0, 0))
    assert figures.computing_share == pytest.approx(0.25)  # 5 of the window's 20 s
    assert figures.swarm_wait_share == pytest.approx(0.75)
    run = RunFigures("sync-10", "sync", 10.0, 1e6, 4e6, [figures], None, None, 0)
    assert run_table([run]).splitlines()[2].endswith("| 25% / 75% |")
    # a node that sent no time split (an older node): no share, and the table says so
    plain = peer_figures(
        "node-1", Snapshot.of(0.0, []), Snapshot.of(1.0, [_peer("node-1", 1, 0, 0)]), None, (0, 0)
    )
    assert (plain.computing_share, plain.swarm_wait_share) == (None, None)


def test_a_peer_missing_from_the_first_read_counts_from_zero() -> None:
    after = Snapshot.of(10.0, [_peer("node-2", 800, 0, 1)])
    figures = peer_figures("node-2", Snapshot.of(0.0, []), after, None, (0, 0))
    assert figures.tokens_per_s == pytest.approx(80.0)
    assert figures.utilisation is None  # the calibration run has no rate to compare with


def test_rounds_are_counted_in_the_window_only() -> None:
    log = (
        "round 0 averaged with 4 peers (80 of 320 sequences ours)\n"
        "round 1 averaged with 1 peers\n"  # alone: not an average
        "round 2: averaging failed (timeout) and no peer has round 3\n"
        "round 3 averaged with 3 peers and the coordinator's follower\n"
        "round 4: refused the group's average (the averaged parameters' loss ...)\n"
        "step 7: the swarm moved on; skipping it (our own gradients ...)\n"
    )
    start = log.index("round 1")
    assert window_counts(log, start, len(log)) == (1, 3)
    assert window_counts(log, 0, start) == (1, 0)


def test_the_loss_at_equal_tokens_is_the_last_evaluation_before_them() -> None:
    evals = [
        {"swarm_tokens": 0, "val_loss": 5.5},
        {"swarm_tokens": 1_000, "val_loss": 4.0},
        {"swarm_tokens": 3_000, "val_loss": 3.0},
    ]
    assert val_at_tokens(evals, 2_000) == 4.0
    assert val_at_tokens(evals, 3_000) == 3.0
    assert val_at_tokens([], 3_000) is None


def test_the_tables_have_a_row_per_run() -> None:
    before = Snapshot.of(0.0, [_peer("node-1", 0, 0, 0)])
    after = Snapshot.of(10.0, [_peer("node-1", 4_000, 1_000_000, 3)])
    peer = peer_figures("node-1", before, after, 500.0, (3, 0))
    evals = [{"swarm_tokens": 100, "val_loss": 4.5}, {"swarm_tokens": 3_900, "val_loss": 3.1}]
    run = RunFigures("diloco-50", "diloco", 50.0, 1e6, 4e6, [peer], 3.1, 3, 4_000, evals)
    rows = run_table([run], at_tokens=2_000).splitlines()
    assert len(rows) == 3 and "| diloco-50 | 50 | 1/4 | 80%; 80% | 400 |" in rows[2]
    assert rows[2].endswith("| 3.100 (3) | 4.500 | - |")  # no time split from the nodes
    assert "1.00 / 2.00" in bytes_table([run])  # averaging MB up / down
    assert bytes_table([run]).endswith("| - |")  # no counters of the capped links
    wired = peer_figures("node-1", before, after, 500.0, (3, 0), wire=(1_500_000, 3_000_000))
    capped = RunFigures("diloco-50", "diloco", 50.0, 1e6, 4e6, [wired], 3.1, 3, 4_000)
    assert bytes_table([capped]).endswith("| 1.50 / 3.00 |")


def test_the_lab_rates_keep_the_real_ratio_at_every_speed() -> None:
    # 320 sequences per round at 40 sequences/s: 8 s of compute per round.
    calibration = Calibration({"node-1": 2_520.0}, 40.0, 320, 115_008, 8)
    assert calibration.round_compute_s == pytest.approx(8.0)
    assert calibration.uplink_50_bps == pytest.approx(115_008 * 8 / 8.0)  # transfer = compute
    assert calibration.lab_uplink_bps(10) == pytest.approx(calibration.uplink_50_bps / 5)
    assert calibration.lab_uplink_bps(200) == pytest.approx(calibration.uplink_50_bps * 4)


def test_a_variant_of_the_sweep_is_named_and_specified_by_what_it_changes() -> None:
    default = SweepConfig()
    assert series("diloco", default) == "diloco"
    assert spec("diloco", default)["optimizer"]["inner_steps"] == 20
    assert "swarm" not in spec("sync", default)
    longer = SweepConfig(inner_steps=100, averaging_timeout_s=60.0)
    assert series("diloco", longer) == "diloco-r100-t60"
    assert series("sync", longer) == "sync-t60"
    assert spec("diloco", longer)["optimizer"]["inner_steps"] == 100
    assert spec("diloco", longer)["swarm"] == {"averaging_timeout_s": 60.0}
