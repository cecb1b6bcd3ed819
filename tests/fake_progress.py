"""A free rider's own progress records: signed, valid, and claiming work it never does.

``python -m tests.fake_progress --initial-peers ADDR --run RUN --identity PATH
--progress-key PATH`` joins the DHT under the libp2p identity at PATH (so its
peer id is the one the rider bound) and publishes a hivemind progress record
for RUN every second, signed with the pickled hivemind key at --progress-key,
with the rate given, until killed. With ``--ahead K`` it is a full (not client-mode)
peer whose epoch is K ahead of the highest other record it reads: the progress hijack.
A process of its own: hivemind's DHT forks.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.utils import get_dht_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--progress-key", type=Path, required=True)
    parser.add_argument("--samples-per-second", type=float, default=10_000.0)
    parser.add_argument("--ahead", type=int, default=0, help="epochs ahead of the swarm")
    args = parser.parse_args()
    private_key = pickle.loads(args.progress_key.read_bytes())
    validator = RSASignatureValidator(private_key)
    dht = hivemind.DHT(
        initial_peers=args.initial_peers,
        client_mode=True,
        start=True,
        identity_path=str(args.identity),
    )
    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=args.run), validator])
    print("publishing as", dht.peer_id.to_base58(), flush=True)
    key = f"{args.run}_progress"
    while True:
        epoch = 0
        if args.ahead:
            found = dht.get(key, latest=True)
            records = found.value if found is not None and isinstance(found.value, dict) else {}
            epochs = [
                r.value["epoch"]
                for subkey, r in records.items()
                if subkey != validator.local_public_key and isinstance(r.value, dict)
            ]
            epoch = max(epochs, default=0) + args.ahead
        progress = LocalTrainingProgress(
            peer_id=dht.peer_id.to_bytes(),
            epoch=epoch,
            samples_accumulated=0,
            samples_per_second=args.samples_per_second,
            time=get_dht_time(),
            client_mode=not args.ahead,
        )
        dht.store(
            key=key,
            subkey=validator.local_public_key,
            value=progress.dict(),
            expiration_time=get_dht_time() + 30,
        )
        time.sleep(1.0)


if __name__ == "__main__":
    main()
