"""``crowdtrain-coordinator``: prepare data, serve, publish runs, export and sample models.

Thin: parses flags into config objects and calls the same functions a
script would. A :class:`CrowdtrainError` becomes one line on stderr and exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any

from crowdtrain.protocol import api
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.logs import setup_logging
from crowdtrain.protocol.version import crowdtrain_version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdtrain-coordinator",
        description="Publish crowdtrain runs and coordinate the nodes that train them.",
    )
    parser.add_argument(
        "--version", action="version", version=f"crowdtrain-coordinator {crowdtrain_version()}"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="write log lines as JSON objects (time, level, logger, message), for log collectors",
    )
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
    srv.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (TLS)")
    srv.add_argument("--tls-key", type=Path, default=None, help="PEM private key (TLS)")
    srv.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without TLS (behind a TLS proxy, or a trusted network)",
    )
    srv.add_argument(
        "--session-ttl",
        type=float,
        default=900.0,
        help="seconds a node's session token lasts before it signs a new challenge",
    )

    pub = sub.add_parser("publish", help="validate a run spec and make the run visible")
    pub.add_argument("spec", type=Path, help="the run spec (.toml)")
    pub.add_argument("--data-dir", required=True, type=Path, help="the coordinator's own folder")
    pub.add_argument("--data", required=True, type=Path, help="folder made by prepare-data")

    inv = sub.add_parser(
        "invite",
        help="make an invite code for an invite-only run",
        description="Ask the running coordinator for a new invite code (needs the admin key).",
    )
    _admin_flags(inv)
    inv.add_argument("--run", required=True, help="the run id")
    inv.add_argument("--uses", type=int, default=1, help="registrations it admits (0: any)")
    inv.add_argument("--expires-in", type=float, default=None, help="seconds until it expires")
    inv.add_argument("--note", default="", help="a reminder of whom it is for")

    ban = sub.add_parser("ban", help="ban a peer from a run (needs the admin key)")
    _admin_flags(ban)
    ban.add_argument("peer_id", help="the peer id shown by /api/runs/RUN/peers")
    ban.add_argument("--run", required=True, help="the run id")
    ban.add_argument("--reason", required=True, help="why (shown to the peer)")

    unban = sub.add_parser("unban", help="lift a ban (needs the admin key)")
    _admin_flags(unban)
    unban.add_argument("peer_id", help="the banned peer's id")
    unban.add_argument("--run", required=True, help="the run id")

    unflag = sub.add_parser("unflag", help="clear a peer's flag (needs the admin key)")
    _admin_flags(unflag)
    unflag.add_argument("peer_id", help="the flagged peer's id")
    unflag.add_argument("--run", required=True, help="the run id")

    exp = sub.add_parser(
        "export",
        help="write a run's latest checkpoint as a transformers model folder",
        description="Export the checkpoint keeper's latest kept checkpoint of a run (or --step) "
        "into OUT. --format hf writes a folder that transformers' "
        "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load.",
    )
    exp.add_argument("out", type=Path, help="folder to write (created; must be empty)")
    exp.add_argument("--run", required=True, help="the run id")
    exp.add_argument("--format", default="hf", help="what to write: hf (the default)")
    _checkpoint_flags(exp)
    exp.add_argument(
        "--force", action="store_true", help="replace OUT's contents if it is not empty"
    )

    smp = sub.add_parser(
        "sample",
        help="print a continuation of a prompt from a run's latest checkpoint",
        description="Load the checkpoint keeper's latest kept checkpoint of a run (or --step) "
        "and print the prompt followed by the model's continuation.",
    )
    smp.add_argument("--run", required=True, help="the run id")
    smp.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    smp.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    smp.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy"
    )
    smp.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)"
    )
    smp.add_argument("--seed", type=int, default=None, help="seed, for a repeatable sample")
    _checkpoint_flags(smp)

    for command in sub.choices.values():
        # Also accepted after the command; SUPPRESS keeps a flag given before it.
        command.add_argument(
            "--log-json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="the coordinator's own folder (may be read while `serve` runs)",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="a kept checkpoint's step (default: the latest)"
    )


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the coordinator's folder: its URL and admin key are read from there",
    )
    parser.add_argument("--url", default=None, help="the coordinator's URL (default: --data-dir's)")
    parser.add_argument(
        "--admin-key",
        type=Path,
        default=None,
        help="file holding the admin key (default: admin.key in --data-dir, or the "
        "CROWDTRAIN_ADMIN_KEY variable)",
    )
    parser.add_argument("--ca-cert", type=Path, default=None, help="CA to trust for https")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(verbose=args.verbose, json_lines=args.log_json)
    try:
        return _COMMANDS[args.command](args)
    except CrowdtrainError as e:
        print(f"crowdtrain-coordinator: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crowdtrain-coordinator: interrupted", file=sys.stderr)
        return 130


def _prepare(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data

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
    from crowdtrain.coordinator.runs.peers import PeerConfig
    from crowdtrain.coordinator.server import ServeConfig, serve

    def announce(ports: dict) -> None:
        print(
            f"coordinator ready\n  http  {ports['http_url']}\n  grpc  {ports['grpc_target']}\n"
            f"  dht   {' '.join(ports['initial_peers'])}\n"
            f"  data  {args.data_dir.resolve()}",
            flush=True,
        )

    if not args.session_ttl > 0:
        raise CrowdtrainError(f"--session-ttl must be positive, got {args.session_ttl}")
    _route_hivemind_logs(args.verbose)
    serve(
        ServeConfig(
            data_dir=args.data_dir,
            host=args.host,
            public_host=args.public_host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            dht_port=args.dht_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            insecure=args.insecure,
            peers=PeerConfig(session_ttl_s=args.session_ttl),
        ),
        on_ready=announce,
    )
    print("coordinator stopped", flush=True)
    return 0


def _route_hivemind_logs(verbose: bool) -> None:
    """Send hivemind's records through the root logger's handler (so --log-json covers them)
    instead of hivemind's own colored handler."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    # Importing hivemind renames the WARNING level "WARN"; log collectors expect WARNING.
    logging.addLevelName(logging.WARNING, "WARNING")
    if not verbose:
        # Leaving its own handler resets the hivemind logger's level to NOTSET.
        logging.getLogger("hivemind").setLevel(logging.WARNING)


def _publish(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.runs.access import coordinator_identity
    from crowdtrain.coordinator.runs.publish import prepare_publication, publish
    from crowdtrain.coordinator.store import Store

    publication = prepare_publication(args.spec, args.data)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise CrowdtrainError(f"--data-dir {args.data_dir} is a file, not a folder")
    store = Store(args.data_dir)
    try:
        # Publishing signs the run with the coordinator's key, which lives in the
        # data folder: having that folder is what makes one its operator.
        result = publish(store, publication, coordinator_identity(args.data_dir))
    finally:
        store.close()
    verb = "already published" if result.already_published else "published"
    print(
        f"{verb} run {result.run_id}: spec {result.spec_hash[:16]}, data "
        f"{result.manifest_hash[:16]}, {result.num_train_shards} train shards"
    )
    return 0


def _admin_request(args: argparse.Namespace, method: str, path: str, body: dict | None) -> Any:
    """One call to the running coordinator's admin API; its JSON answer."""
    import httpx

    url = args.url
    if url is None and args.data_dir is not None:
        ports = args.data_dir / "ports.json"
        try:
            url = json.loads(ports.read_text())["http_url"]
        except (OSError, ValueError, KeyError):
            raise CrowdtrainError(
                f"no running coordinator found in {args.data_dir} (no {ports.name}); start "
                "`crowdtrain-coordinator serve` there or pass --url"
            ) from None
    if url is None:
        raise CrowdtrainError("pass --data-dir (the coordinator's folder) or --url")
    key = os.environ.get("CROWDTRAIN_ADMIN_KEY", "")
    key_file = args.admin_key or (args.data_dir / "admin.key" if args.data_dir else None)
    if key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as e:
            raise CrowdtrainError(f"cannot read the admin key {key_file}: {e.strerror}") from None
    if not key:
        raise CrowdtrainError("no admin key: pass --admin-key FILE or --data-dir")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,256}", key):
        raise CrowdtrainError(
            f"{key_file or 'CROWDTRAIN_ADMIN_KEY'} does not hold an admin key (one line of "
            "letters, digits, - and _, as admin.key in the coordinator's folder)"
        )
    verify: Any = ssl.create_default_context(cafile=str(args.ca_cert)) if args.ca_cert else True
    try:
        response = httpx.request(
            method,
            f"{url.rstrip('/')}{path}",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30.0,
            verify=verify,
        )
    except httpx.HTTPError as e:
        raise CrowdtrainError(f"cannot reach the coordinator at {url}: {e}") from None
    if response.status_code >= 400:
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = response.text[:200]
        raise CrowdtrainError(f"the coordinator refused (HTTP {response.status_code}): {detail}")
    return response.json()


# The flag each field of an admin request comes from, to name it in an error.
_FLAGS = {
    "uses": "--uses",
    "expires_in_s": "--expires-in",
    "note": "--note",
    "peer_id": "PEER_ID",
    "reason": "--reason",
}


def _request_body(shape: type[api.Request], **values: Any) -> dict[str, Any]:
    """An admin request's body, built as the protocol model the coordinator parses; a bad
    flag is refused here, naming it."""
    from pydantic import ValidationError

    try:
        return shape(**values).model_dump(mode="json")
    except ValidationError as e:
        error = e.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        raise CrowdtrainError(f"{_FLAGS.get(field, field)}: {error['msg']}") from None


def _invite(args: argparse.Namespace) -> int:
    body = _request_body(
        api.InviteRequest, uses=args.uses, expires_in_s=args.expires_in, note=args.note
    )
    answer = _admin_request(args, "POST", api.path(api.ADMIN_INVITES, run_id=args.run), body)
    try:
        invite = api.InviteCreated.model_validate(answer)
    except ValueError:
        raise CrowdtrainError(f"the coordinator answered no invite: {answer!r:.200}") from None
    uses = "any number of" if invite.uses == 0 else str(invite.uses)
    print(invite.code)
    print(
        f"invite for run {invite.run_id}: {uses} registration(s); a node joins with "
        f"`crowdtrain-node join URL --run {invite.run_id} --invite {invite.code}`",
        file=sys.stderr,
    )
    return 0


def _ban(args: argparse.Namespace) -> int:
    body = _request_body(api.BanRequest, peer_id=args.peer_id, reason=args.reason)
    _admin_request(args, "POST", api.path(api.ADMIN_BANS, run_id=args.run), body)
    print(f"banned peer {args.peer_id} from run {args.run}")
    return 0


def _unban(args: argparse.Namespace) -> int:
    _admin_request(
        args, "DELETE", api.path(api.ADMIN_BAN, run_id=args.run, peer_id=args.peer_id), None
    )
    print(f"peer {args.peer_id} may join run {args.run} again")
    return 0


def _unflag(args: argparse.Namespace) -> int:
    _admin_request(
        args, "DELETE", api.path(api.ADMIN_FLAG, run_id=args.run, peer_id=args.peer_id), None
    )
    print(f"peer {args.peer_id} of run {args.run} is no longer flagged")
    return 0


def _export(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.export import export_run

    result = export_run(
        args.data_dir,
        args.run,
        args.out,
        fmt=args.format,
        step=args.step,
        force=args.force,
        progress=True,
    )
    print(
        f"exported run {result.run_id} at step {result.step} to {result.out} "
        f"({', '.join(p.name for p in result.files)}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(result.out)!r})"
    )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from crowdtrain.coordinator.export import SampleConfig, sample

    config = SampleConfig(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
    )
    step, continuation = sample(args.data_dir, args.run, config, step=args.step)
    logging.getLogger(__name__).info("run %s, checkpoint of step %d", args.run, step)
    print(args.prompt + continuation)
    return 0


_COMMANDS = {
    "prepare-data": _prepare,
    "serve": _serve,
    "publish": _publish,
    "invite": _invite,
    "ban": _ban,
    "unban": _unban,
    "unflag": _unflag,
    "export": _export,
    "sample": _sample,
}

if __name__ == "__main__":
    sys.exit(main())
