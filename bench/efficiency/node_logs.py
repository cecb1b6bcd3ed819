"""What the efficiency bench reads from a node's log: the node's lines it relies on.

Each pattern here is a line the node writes (node/node.py, node/swarm/diloco.py,
node/device/hooks.py); change them together. Knows nothing about swarms.
"""

from __future__ import annotations

import datetime
import re

# node: the first optimizer step this process took part in
FIRST_STEP = re.compile(r"first contributing step ([\d.]+) s after process start")
# node: state downloaded by a joiner (from peers, or the keeper's checkpoint over HTTP)
LOADED_STATE = re.compile(
    r"(?:loaded (?:the global )?state of (?:step|round)|started from the keeper's checkpoint of "
    r"step) (\d+)(?:.* in ([\d.]+)s)?"
)
# hooks: the slowdown test hook announces itself
THROTTLE = "TEST HOOK, this node sleeps to train"


def round_done(round_: int) -> re.Pattern[str]:
    """diloco: round ``round_``'s outer step applied ("averaged") or given up ("round r: ...")."""
    return re.compile(rf"round {round_} (averaged|: )")


# Where a joiner's start-up time goes: the first line each stage logs.
_STAGES = {
    "first log line (imports, coordinator contact)": r"",
    "spec and data checked": r"crowdtrain \S+, run ",
    "joined the swarm (DHT, optimizer)": r"joined the swarm as",
    "state loaded from peers": r"loaded (?:the global )?state",
    "state loaded from the keeper over HTTP": r"started from the keeper's checkpoint",
    "first contributing step": r"first contributing step",
}


def timeline(log: str, popen_at: float) -> dict[str, float]:
    """Seconds from the joiner's Popen to each stage's first log line (log times are local)."""
    out = {}
    for stage, pattern in _STAGES.items():
        for line in log.splitlines():
            match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            if match and re.search(pattern, line):
                when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
                out[stage] = round(when.timestamp() + int(match.group(2)) / 1000 - popen_at, 1)
                break
    return out


def diloco_round_tokens(log: str, rounds: int, seq_len: int) -> int | None:
    """Tokens the swarm trained in the first ``rounds`` rounds, from a node's
    'round r averaged with n peers (x of y sequences ours)' lines."""
    found = {}
    for m in re.finditer(
        r"round (\d+) averaged with \d+ peers \([\d.]+ of ([\d.]+) sequences", log
    ):
        found[int(m.group(1))] = float(m.group(2))
    if not all(r in found for r in range(rounds)):
        return None
    return int(sum(found[r] for r in range(rounds)) * seq_len)
