"""Training efficiency of a crowdtrain swarm against one process and against plain hivemind.

Every peer is a real process on loopback (``crowdtrain-coordinator serve``,
``crowdtrain-node join``) with one torch thread; the single-process baseline
uses as many threads as the swarm's peers have together, at most 2 (this
machine's cores). The workload is the demo's tiny GPT (examples/stdlib-tiny.toml
for sync, examples/stdlib-diloco.toml for diloco) on the bundled corpus.

Parts (``--parts``, all by default), in the order they run:

- ``solo``: tokens/s of one node-sized loop alone, no averaging (1 thread)
- ``throughput``: each peer's tokens/s in a 2-peer swarm, sync and diloco
- ``hivemind``: the same 2 peers with plain ``hivemind.Optimizer`` and its defaults
- ``loss``: 4-peer sync and diloco swarms to ``--rounds`` diloco rounds of tokens,
  with every peer's bytes sent
- ``baseline``: one process at the same global batch, evaluated at the swarms' tokens
- ``late_joiner``: a third node joining a 10M-parameter run, start to first step
- ``half_speed``: a throttled node's share of samples against its share of compute
- ``robust``: a 3-peer sync swarm's tokens/s under ``[trust] aggregation = "mean"`` and
  ``"centered_clip"``, alternated twice

Each part's raw numbers go to ``efficiency.json`` beside ``--out`` as soon as it
ends (a failed part records its error and the rest still run); the markdown
table and the plots are rebuilt from that file (``--report-only`` does only that).

From the repository's root:

    python -m bench.efficiency --out bench/results/efficiency.md            # about 30 min
    python -m bench.efficiency --quick --out /tmp/eff/efficiency.md         # a few minutes

Modules: plan (how long each part runs), parts (the parts themselves),
swarm (a coordinator and nodes for one figure), traffic (bytes each peer
sends), reference (plain hivemind), baseline (one process alone), specs,
data, node_logs, processes, foreign_cpu and report (efficiency.md and plots).
"""

from pathlib import Path

# The repository: examples/, bench/results/ and the tests/swarm.py harness live there.
ROOT = Path(__file__).resolve().parents[2]
