"""The guard drops hostile averaging parts and results and reports their senders.

The all-reduce tests run hivemind's real protocol between three in-process
peers (each with its own p2p daemon), one of them hostile.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import averaging_pb2

from crowdtrain.node.device.hooks import TestHooks
from crowdtrain.node.swarm.allreduce import GuardedAllReduceRunner
from crowdtrain.node.swarm.guard import (
    CLIP_BOUND,
    NORM_BOUND,
    GuardConfig,
    SwarmGuard,
    clip_scale,
    norm_problem,
    part_problem,
    reference_norm,
    result_problem,
    slice_problem,
)
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.runspec import TrustSection

SHAPE = torch.Size([1000])


@pytest.fixture
def local() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SHAPE)


def test_an_honest_part_is_accepted(local: torch.Tensor) -> None:
    part = local + 0.5 * torch.randn(SHAPE)
    assert part_problem(part, 16.0, SHAPE, max_weight=64.0) is None
    assert part_problem(part, 0.0, SHAPE, max_weight=64.0) is None


@pytest.mark.parametrize(
    ("make", "weight", "reason"),
    [
        (lambda x: torch.full_like(x, math.nan), 16.0, "non-finite"),
        (lambda x: x.clone().index_fill_(0, torch.tensor([7]), math.inf), 16.0, "non-finite"),
        (lambda x: x[:999].clone(), 16.0, "shape"),
        (lambda x: x.reshape(10, 100).clone(), 16.0, "shape"),
        (lambda x: x.to(torch.int64), 16.0, "dtype"),
        (lambda x: x, 1600.0, "weight"),
        (lambda x: x, -1.0, "weight"),
        (lambda x: x, math.nan, "weight"),
    ],
)
def test_hostile_parts_are_refused_with_their_reason(
    local: torch.Tensor, make, weight: float, reason: str
) -> None:
    assert part_problem(make(local), weight, SHAPE, max_weight=64.0) == reason


def test_a_part_that_does_not_deserialize_is_malformed() -> None:
    assert part_problem(None, 16.0, SHAPE, 64.0) == "malformed"


def test_sizes_are_judged_against_the_lower_median_of_all_senders() -> None:
    # three senders: the outlier does not move the reference
    assert reference_norm([1.0, 3.0, 5000.0]) == 3.0
    # two: the smaller is the reference; zeros (nothing to compare) are left out
    assert reference_norm([2.0, 0.0, 1000.0]) == 2.0
    assert reference_norm([0.0]) is None
    assert norm_problem(5000.0, 3.0) == "norm"  # a part scaled by -1000
    assert norm_problem(NORM_BOUND * 3.0, 3.0) is None
    assert norm_problem(5000.0, None) is None
    # a spike between the bounds is scaled down to CLIP_BOUND times the reference
    assert clip_scale(2.0, 1.0) == 1.0
    assert clip_scale(50.0, 1.0) * 50.0 == pytest.approx(CLIP_BOUND)
    assert clip_scale(50.0, None) == 1.0


def test_results_are_checked(local: torch.Tensor) -> None:
    assert result_problem(0.1 * local, SHAPE, local) is None
    assert result_problem(torch.full_like(local, math.nan), SHAPE, local) == "non-finite"
    assert result_problem(local * -2000, SHAPE, local) == "norm"
    assert result_problem(local * 100, SHAPE, local) is None  # our part alone is a noisy yardstick
    assert result_problem(local[:10], SHAPE, local) == "shape"
    assert result_problem(None, SHAPE, local) == "malformed"


def test_reports_are_aggregated_and_drained_once(tmp_path: Path) -> None:
    guard = SwarmGuard(tmp_path / "guard", target_batch_size=32)
    assert guard.drain_reports() == []
    config = guard.config  # what the averager processes hold
    for _ in range(3):
        config.report("QmBad", "non-finite")
    config.report("QmBad", "norm")
    config.report("QmOther", "weight")
    with open(config.reports_path, "a") as file:
        file.write('{"dht_peer_id": "QmHalf", "reas')  # an append still being written
    assert [r.model_dump() for r in guard.drain_reports()] == [
        {"dht_peer_id": "QmBad", "reason": "non-finite", "count": 3},
        {"dht_peer_id": "QmBad", "reason": "norm", "count": 1},
        {"dht_peer_id": "QmOther", "reason": "weight", "count": 1},
    ]
    assert guard.drain_reports() == []
    with open(config.reports_path, "a") as file:
        file.write('on": "shape", "count": 1}\n')
    assert [r.model_dump() for r in guard.drain_reports()] == [
        {"dht_peer_id": "QmHalf", "reason": "shape", "count": 1}
    ]


def test_roster_reaches_the_averagers_and_a_restart_starts_clean(tmp_path: Path) -> None:
    guard = SwarmGuard(tmp_path, target_batch_size=32)
    assert guard.config.read_roster() == {}
    guard.update_roster({"QmA": 64, "QmBanned": 0})
    assert guard.config.read_roster() == {"QmA": 64.0, "QmBanned": 0.0}
    # a peer the roster does not list counts as a newcomer; nobody may claim past 4 targets
    assert (guard.config.unknown_max_weight, guard.config.max_claim) == (32.0, 128.0)
    guard.config.report("QmA", "norm")
    again = SwarmGuard(tmp_path, target_batch_size=32)
    assert again.drain_reports() == []
    assert again.config.read_roster() == {}


def test_an_unknown_attack_hook_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROWDTRAIN_TEST_ATTACK", "sometimes")
    with pytest.raises(CrowdtrainError, match="CROWDTRAIN_TEST_ATTACK"):
        TestHooks.from_env()
    monkeypatch.setenv("CROWDTRAIN_TEST_ATTACK", "cycle")
    guard = SwarmGuard(tmp_path, target_batch_size=32, attack=TestHooks.from_env().attack)
    assert guard.config.attack == "cycle"  # what the forked averagers read


class HostileReducer(GuardedAllReduceRunner):
    """Averages honestly but returns NaN results to the peers whose slice it reduces."""

    async def _accumulate_parts_streaming(self, stream, sender_index):
        async for message in super()._accumulate_parts_streaming(stream, sender_index):
            if message.code == averaging_pb2.AVERAGED_PART:
                message = averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART,
                    tensor_part=_nan_like(message.tensor_part),
                )
            yield message

    @classmethod
    def _get_handle_name(cls, namespace, method_name):
        return GuardedAllReduceRunner._get_handle_name(namespace, method_name)


def _nan_like(serialized):
    return serialize_torch_tensor(torch.full_like(deserialize_torch_tensor(serialized), math.nan))


async def _all_reduce(
    folder: Path,
    attack: str,
    hostile_reducer: bool,
    values: tuple[float, ...] = (1.0, 3.0, 5.0),
    weights: tuple[float, ...] = (1.0, 1.0, 1.0),
    aggregation: str = "centered_clip",
    flagged: bool = False,
    max_claim: float = 0.0,
) -> list[torch.Tensor]:
    """As many peers as ``values`` (three by default) average them (as vectors) by
    ``aggregation``; the last may be hostile, and ``flagged`` (the roster bounds its weight
    to 0).

    Returns the other peers' results."""
    p2ps = [await P2P.create()]
    maddrs = await p2ps[0].get_visible_maddrs()
    p2ps += [await P2P.create(initial_peers=maddrs) for _ in values[1:]]
    try:
        peer_ids = [p.peer_id for p in p2ps]
        tensors = [[torch.full((3000,), float(v)), torch.full((17,), float(v))] for v in values]
        runners = []
        for index, p2p in enumerate(p2ps):
            hostile = index == len(values) - 1
            guard = GuardConfig(
                folder / f"peer{index}",
                unknown_max_weight=10.0,
                trust=TrustSection(aggregation=aggregation),  # type: ignore[arg-type]
            )
            guard.folder.mkdir(parents=True)
            cls = HostileReducer if hostile and hostile_reducer else GuardedAllReduceRunner
            runner = cls(
                guard=guard,
                max_weight=lambda peer_id: 0.0 if flagged and peer_id == peer_ids[-1] else 10.0,
                max_claim=max_claim,
                attack=attack if hostile else "",
                p2p=p2p,
                servicer_type=GuardedAllReduceRunner,
                prefix=None,
                group_id=b"group",
                tensors=[t.clone() for t in tensors[index]],
                weight=weights[index],
                ordered_peer_ids=peer_ids,
                peer_fractions=(1.0,) * len(values),
                part_size_bytes=1024,
                sender_timeout=5.0,
                reducer_timeout=10.0,
            )
            await runner.add_p2p_handlers(p2p)
            runners.append(runner)

        async def run(runner: GuardedAllReduceRunner) -> None:
            local = runner.tensor_part_container.local_tensors
            index = 0
            async for delta in runner:
                local[index].add_(delta)
                index += 1

        await asyncio.wait_for(asyncio.gather(*(run(r) for r in runners)), timeout=60)
        return [torch.cat(r.tensor_part_container.local_tensors) for r in runners[:-1]]
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


def _reports(folder: Path) -> list[dict]:
    path = folder / "reports.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    ("attack", "reason"), [("nan", "non-finite"), ("scale", "norm"), ("weight", "weight")]
)
def test_a_hostile_senders_parts_are_dropped_and_reported(
    tmp_path: Path, attack: str, reason: str
) -> None:
    results = asyncio.run(_all_reduce(tmp_path, attack, hostile_reducer=False))
    for result in results:
        assert torch.isfinite(result).all()
        # Slices that honest peers reduced average the honest values only (2); the
        # hostile peer's own slice averaged its honest local value too (3).
        values = set(result.unique().tolist())
        assert 2.0 in values and values <= {2.0, 3.0}, values
    hostile = None
    for index in (0, 1):
        reports = _reports(tmp_path / f"peer{index}")
        assert reports and {r["reason"] for r in reports} == {reason}, reports
        assert len({r["dht_peer_id"] for r in reports}) == 1
        hostile = hostile or reports[0]["dht_peer_id"]
        assert reports[0]["dht_peer_id"] == hostile
    assert _reports(tmp_path / "peer2") == []


def test_a_claim_past_the_senders_cap_counts_at_the_cap(tmp_path: Path) -> None:
    """The roster caps each sender's weight by its verified work (10 here); a claim above
    the cap and up to ``max_claim`` (what no honest peer exceeds) is counted at the cap,
    neither refused nor reported: the third peer claims 30 under the plain mean, and the
    slices honest peers reduce average (1 + 3 + 10 * 5) / 12 = 4.5, not 154 / 32."""
    results = asyncio.run(
        _all_reduce(
            tmp_path, "", False, weights=(1.0, 1.0, 30.0), aggregation="mean", max_claim=40.0
        )
    )
    for result in results:
        values = set(result.unique().tolist())
        # (the third peer's own slice counts its own claim: 154 / 32)
        assert 4.5 in values and values <= {4.5, 154 / 32}, values
    assert all(_reports(tmp_path / f"peer{index}") == [] for index in range(3))


def test_a_hostile_reducers_results_are_not_used(tmp_path: Path) -> None:
    results = asyncio.run(_all_reduce(tmp_path, "", hostile_reducer=True))
    for index, result in enumerate(results):
        assert torch.isfinite(result).all()
        # Both step on nothing in the hostile reducer's slice (zero). Elsewhere the average
        # is 3, or 2 for parts that arrived after its sender was banned for its results.
        values = set(result.unique().tolist())
        assert 0.0 in values and values <= {0.0, 2.0, 3.0}, values
        assert {r["reason"] for r in _reports(tmp_path / f"peer{index}")} == {"non-finite"}
    assert torch.equal(results[0] == 0, results[1] == 0)


def test_a_slices_results_are_judged_by_their_direction_together() -> None:
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(500, generator=generator) + 0.5 for _ in range(3)]
    honest = [o + torch.randn(500, generator=generator) for o in ours]  # others' noise
    assert slice_problem(honest, ours) is None
    assert slice_problem([-100 * h for h in honest], ours) == "contrary"
    # Refused but nobody blamed: the mean of ours and one flipped part (what an honest
    # reducer returns when its rule had only two parts) points against ours too, but
    # pulls by at most CLIP_BOUND times ours.
    assert slice_problem([-h for h in honest], ours) == "against"
    flipped_mean = [(o - CLIP_BOUND * h) / 2 for o, h in zip(ours, honest, strict=True)]
    assert slice_problem(flipped_mean, ours) == "against"
    noisy = [
        h - 2.5 * o + 50 * torch.randn(500, generator=generator)
        for h, o in zip(honest, ours, strict=True)
    ]
    assert slice_problem(noisy, ours) == "against"  # by how far it pulls against ours
    # one part against ours among parts with ours: the slice as a whole decides
    assert slice_problem([-honest[0], honest[1], honest[2]], ours) is None
    assert slice_problem(honest, [torch.zeros(500)] * 3) is None  # nothing of ours to judge by


def test_a_reducer_returning_its_slice_flipped_is_refused_and_reported(tmp_path: Path) -> None:
    """The ``reducer`` hook: honest parts, every result returned times -100."""
    results = asyncio.run(_all_reduce(tmp_path, "reducer", hostile_reducer=False))
    for index, result in enumerate(results):
        # Both honest peers step on nothing in the hostile reducer's slice (zero: they stay
        # in step with each other); elsewhere the average is 3, or 2 for parts that
        # arrived after its sender was banned for its results.
        values = set(result.unique().tolist())
        assert 0.0 in values and values <= {0.0, 2.0, 3.0}, values
        assert {r["reason"] for r in _reports(tmp_path / f"peer{index}")} == {"contrary"}
    assert torch.equal(results[0] == 0, results[1] == 0)  # the same slice, refused by both


def test_a_flagged_peer_neither_reduces_nor_sends_for_us(tmp_path: Path) -> None:
    """Once the roster bounds a peer to nothing, its results are not even asked for (we
    step on nothing in its slice: no result of its is judged or reported) and its parts
    are refused for their weight."""
    results = asyncio.run(_all_reduce(tmp_path, "reducer", hostile_reducer=False, flagged=True))
    for index, result in enumerate(results):
        values = set(result.unique().tolist())
        assert values == {0.0, 2.0}, values
        assert {r["reason"] for r in _reports(tmp_path / f"peer{index}")} == {"weight"}
    assert torch.equal(results[0], results[1])


def test_under_the_mean_a_spike_is_clipped_quietly(tmp_path: Path) -> None:
    """An honest peer whose gradient spiked (50x the typical) is scaled down, not reported."""
    results = asyncio.run(
        _all_reduce(tmp_path, "", hostile_reducer=False, values=(1, 3, 150), aggregation="mean")
    )
    clipped = (1 + 3 + CLIP_BOUND * 3) / 3  # slices the first two reduce: 150 clipped to 30
    own_slice = (1 + 3 + 150) / 3  # the spiking peer's own part is its own business
    for result in results:
        values = result.unique().tolist()
        assert len(values) == 2 and values == pytest.approx(sorted([clipped, own_slice])), values
    for index in range(3):
        assert _reports(tmp_path / f"peer{index}") == []


def test_under_centered_clip_a_spike_changes_nothing_and_is_reported_far(tmp_path: Path) -> None:
    """The same spike under the default rule: every slice averages to the median's 3 (the
    spike's pull is clipped to the others' distance from it, which the low part's
    balances), and the honest reducers report it as far (one such round flags no one:
    the coordinator needs three reports)."""
    results = asyncio.run(_all_reduce(tmp_path, "", hostile_reducer=False, values=(1, 3, 150)))
    for result in results:
        assert all(v == pytest.approx(3.0, abs=1e-5) for v in result.unique().tolist())
    spiking = None
    for index in (0, 1):
        reports = _reports(tmp_path / f"peer{index}")
        assert [r["reason"] for r in reports] == ["far"], reports
        spiking = spiking or reports[0]["dht_peer_id"]
        assert reports[0]["dht_peer_id"] == spiking
    assert _reports(tmp_path / "peer2") == []


@pytest.mark.parametrize("aggregation", ["mean", "trimmed_mean", "centered_clip"])
def test_a_sign_flip_inside_the_bounds_wins_only_the_mean(tmp_path: Path, aggregation: str) -> None:
    """A sender that flips its part and scales it by 9.9 (under CLIP_BOUND, so the norm
    checks pass it) turns the mean of the honest 1 and 3 negative; the robust rules keep
    every slice the honest peers reduce within the honest values, and report the sender."""
    results = asyncio.run(
        _all_reduce(tmp_path, "flip", hostile_reducer=False, aggregation=aggregation)
    )
    for result in results:
        values = result.unique().tolist()
        if aggregation == "mean":
            assert min(values) < 0, values  # (1 + 3 - 9.9 * 5) / 3
        else:
            # 3 on the attacker's own slice (its local part is the honest 5)
            assert all(1.0 <= v <= 3.0 for v in values), values
    reported = [_reports(tmp_path / f"peer{index}") for index in (0, 1)]
    if aggregation == "centered_clip":
        assert all([r["reason"] for r in seen] == ["far"] for seen in reported), reported
    elif aggregation == "mean":
        assert reported == [[], []]


@pytest.mark.parametrize("aggregation", ["trimmed_mean", "centered_clip"])
def test_a_round_met_by_the_flipper_alone_moves_nothing(tmp_path: Path, aggregation: str) -> None:
    """An honest peer and a flipper (9.9 times its honest 1, within CLIP_BOUND) in a group
    of two: no rule can outvote it, the result of every slice is the mean (1 - 9.9) / 2,
    against the honest part. The honest peer refuses it in its own slice, steps on nothing
    there (0) and blames nobody; before, it took it (-4.45), and fresh-clone CI saw an
    honest node's loss go from 3.9 to 6.8 in the three-peer sign-flip test. (The flipper's
    own slice averages its honest 1 with ours: the hook flips only the parts it sends.)"""
    [result] = asyncio.run(
        _all_reduce(
            tmp_path,
            "flip",
            hostile_reducer=False,
            values=(1, 1),
            weights=(1, 1),
            aggregation=aggregation,
        )
    )
    assert set(result.unique().tolist()) == {0.0, 1.0}, result.unique()
    assert _reports(tmp_path / "peer0") == []


def test_a_reducer_with_nothing_of_its_own_judges_by_the_others(tmp_path: Path) -> None:
    """A peer tagging along with weight 0 still drops a -1000 part, and nobody blames it."""
    results = asyncio.run(
        _all_reduce(tmp_path, "scale", hostile_reducer=False, values=(0, 3, 5), weights=(0, 1, 1))
    )
    for result in results:
        assert torch.isfinite(result).all()
        assert set(result.unique().tolist()) <= {3.0, 4.0}  # 4 on the attacker's own slice
    for index in (0, 1):
        assert {r["reason"] for r in _reports(tmp_path / f"peer{index}")} == {"norm"}
    assert _reports(tmp_path / "peer2") == []
