"""``crowdtrain-coordinator``: prepare data, serve, publish runs.

Thin: parses flags into config objects and calls the same functions a
script would. A :class:`CrowdtrainError` becomes one line on stderr and exit
status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from crowdtrain.protocol.errors import CrowdtrainError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdtrain-coordinator",
        description="Publish crowdtrain runs and coordinate the nodes that train them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser(
        "prepare-data",
        help="turn a corpus into token shards and a manifest",
        description="Read a corpus, tokenize it (bytes or a BPE trained on it) and write "
        "token shards, a manifest and, for bpe, tokenizer.json into --out.",
    )
    prep.add_argument(
        "--source",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="'stdlib' (Python's own standard library), text files and folders, .jsonl or "
        ".parquet files, a folder saved by datasets' save_to_disk, or hf:NAME[:SPLIT]",
    )
    prep.add_argument("--out", required=True, type=Path, help="folder to write shards into")
    prep.add_argument("--shard-tokens", type=int, default=1_048_576, help="tokens per shard")
    prep.add_argument(
        "--val-fraction", type=float, default=0.005, help="share of documents held out"
    )
    prep.add_argument(
        "--max-val-tokens",
        type=int,
        default=262_144,
        help="most text bytes (so tokens) held out for validation",
    )
    prep.add_argument(
        "--text-field",
        default="text",
        help="field (JSON Lines, datasets) or column (Parquet) holding the text",
    )
    prep.add_argument(
        "--split", default="train", help="split of a dataset dict or an hf: source without one"
    )
    prep.add_argument(
        "--tokenizer", choices=("byte", "bpe"), default="byte", help="byte-level or a trained BPE"
    )
    prep.add_argument(
        "--vocab-size", type=int, default=None, help="BPE vocabulary, 257..65535 (default 4096)"
    )
    prep.add_argument(
        "--bpe-train-bytes",
        type=int,
        default=100_000_000,
        help="train the BPE on this many bytes from the start of the corpus",
    )

    srv = sub.add_parser("serve", help="run the coordinator (gRPC, HTTP, DHT)")
    srv.add_argument("--data-dir", required=True, type=Path, help="the coordinator's own folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--public-host", default=None, help="address nodes should dial, if not --host")
    srv.add_argument("--http-port", type=int, default=8470, help="0 picks a free port")
    srv.add_argument("--grpc-port", type=int, default=8471, help="0 picks a free port")
    srv.add_argument("--dht-port", type=int, default=8472, help="0 picks a free port")

    pub = sub.add_parser("publish", help="validate a run spec and make the run visible")
    pub.add_argument("spec", type=Path, help="the run spec (.toml)")
    pub.add_argument("--data-dir", required=True, type=Path, help="the coordinator's own folder")
    pub.add_argument("--data", required=True, type=Path, help="folder made by prepare-data")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # hivemind reads its level once, at import, from this variable.
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
        for noisy in ("hivemind", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # hivemind's averagers leave cancelled asyncio tasks behind on every
        # partial round; asyncio reports them as errors that no user can act on.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        return _COMMANDS[args.command](args)
    except CrowdtrainError as e:
        print(f"crowdtrain-coordinator: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crowdtrain-coordinator: interrupted", file=sys.stderr)
        return 130


def _prepare(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.prepare import PrepareConfig, prepare_data

    manifest = prepare_data(
        PrepareConfig(
            sources=tuple(args.source),
            out=args.out,
            shard_tokens=args.shard_tokens,
            val_fraction=args.val_fraction,
            max_val_tokens=args.max_val_tokens,
            text_field=args.text_field,
            split=args.split,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            bpe_train_bytes=args.bpe_train_bytes,
        )
    )
    print(
        f"prepared {args.out}: {len(manifest.train_shards)} train shards "
        f"({manifest.num_train_tokens:,} tokens), {len(manifest.val_shards)} validation shard, "
        f"{manifest.tokenizer} tokenizer ({manifest.vocab_size} ids), "
        f"manifest {manifest.hash[:16]}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.server import ServeConfig, serve

    def announce(ports: dict) -> None:
        print(
            f"coordinator ready\n  http  {ports['http_url']}\n  grpc  {ports['grpc_target']}\n"
            f"  dht   {' '.join(ports['initial_peers'])}\n"
            f"  data  {args.data_dir.resolve()}",
            flush=True,
        )

    serve(
        ServeConfig(
            data_dir=args.data_dir,
            host=args.host,
            public_host=args.public_host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            dht_port=args.dht_port,
        ),
        on_ready=announce,
    )
    print("coordinator stopped", flush=True)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.runs import prepare_publication, publish
    from crowdtrain.coordinator.store import Store

    publication = prepare_publication(args.spec, args.data)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise CrowdtrainError(f"--data-dir {args.data_dir} is a file, not a folder")
    store = Store(args.data_dir)
    try:
        result = publish(store, publication)
    finally:
        store.close()
    verb = "already published" if result.already_published else "published"
    print(
        f"{verb} run {result.run_id}: spec {result.spec_hash[:16]}, data "
        f"{result.manifest_hash[:16]}, {result.num_train_shards} train shards"
    )
    return 0


_COMMANDS = {"prepare-data": _prepare, "serve": _serve, "publish": _publish}

if __name__ == "__main__":
    sys.exit(main())
