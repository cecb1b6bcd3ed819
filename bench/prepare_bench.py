"""Benchmark `crowdtrain-coordinator prepare-data`: throughput and peak memory.

Runs the command line the way a user does, each case in a fresh process, on
the bundled standard-library corpus and on a folder ten times larger (the
standard library's ``.py`` files copied ten times into a temporary folder,
removed afterwards). Writes a markdown fragment to ``--out`` and prints it.

    python bench/prepare_bench.py --out bench/results/prepare.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

COPIES = 10
VOCAB_SIZE = 4096
MEMORY_GOAL = 1.5
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}

# Runs one command and reports its peak RSS: a fresh process per case, so
# RUSAGE_CHILDREN sees that command only.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall_s = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stderr[-2000:])
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"wall_s": wall_s, "peak_mib": peak_kib / 1024}))
"""


@dataclass(frozen=True)
class Result:
    tokenizer: str
    corpus: str
    text_mb: float
    wall_s: float
    peak_mib: float
    num_tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.text_mb / self.wall_s


def _coordinator() -> list[str]:
    script = Path(sys.executable).with_name("crowdtrain-coordinator")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "crowdtrain.coordinator.cli"]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def _build_copies(target: Path) -> None:
    """The standard library's ``.py`` files, ``COPIES`` times, under distinct subfolders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    for copy in range(COPIES):
        for path in files:
            destination = target / f"copy{copy:02d}" / path.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def _run(tokenizer: str, corpus: str, source: str, out: Path, bpe_train_bytes: int) -> Result:
    command = [*_coordinator(), "prepare-data", "--source", source, "--out", str(out)]
    command += ["--tokenizer", tokenizer]
    if tokenizer == "bpe":
        command += ["--vocab-size", str(VOCAB_SIZE), "--bpe-train-bytes", str(bpe_train_bytes)]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    measured = json.loads(done.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    num_documents = int(manifest["source"].split()[0])
    num_bytes = sum(s["num_bytes"] for s in manifest["shards"]) - num_documents
    result = Result(
        tokenizer=tokenizer,
        corpus=corpus,
        text_mb=num_bytes / 1e6,
        wall_s=measured["wall_s"],
        peak_mib=measured["peak_mib"],
        num_tokens=sum(s["num_tokens"] for s in manifest["shards"]),
    )
    shutil.rmtree(out)
    print(
        f"  {tokenizer:4} {corpus:18} {result.text_mb:7.1f} MB in {result.wall_s:6.1f} s, "
        f"peak {result.peak_mib:6.0f} MiB",
        flush=True,
    )
    return result


def _markdown(results: list[Result], command: str, bpe_train_bytes: int) -> str:
    lines = [
        "## prepare-data",
        "",
        f"`{command}` on {platform.system()} with {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Each case is one run of "
        "`crowdtrain-coordinator prepare-data` in a fresh process; time is its whole wall "
        "clock (start-up included), memory its peak RSS. BPE: vocabulary "
        f"{VOCAB_SIZE}, trained on the first {bpe_train_bytes / 1e6:.0f} MB.",
        "",
        "| tokenizer | corpus | text MB | tokens | wall s | MB/s | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.tokenizer} | {r.corpus} | {r.text_mb:.1f} | {r.num_tokens:,} | "
            f"{r.wall_s:.1f} | {r.mb_per_s:.1f} | {r.peak_mib:.0f} |"
        )
    lines.append("")
    by_case = {(r.tokenizer, r.corpus): r for r in results}
    for tokenizer in ("byte", "bpe"):
        small, large = by_case.get((tokenizer, "stdlib")), by_case.get((tokenizer, "stdlib x10"))
        if small and large:
            ratio = large.peak_mib / small.peak_mib
            verdict = "meets" if ratio < MEMORY_GOAL else "misses"
            lines.append(
                f"- {tokenizer}: peak memory at 10x the corpus is {ratio:.2f}x that at 1x "
                f"({verdict} the goal of < {MEMORY_GOAL}x)."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown fragment to write")
    parser.add_argument(
        "--bpe-train-bytes",
        type=int,
        default=100_000_000,
        help="BPE training bytes (prepare-data's default: 100 MB)",
    )
    parser.add_argument(
        "--skip-bpe-x10", action="store_true", help="leave out BPE on the 10x corpus"
    )
    args = parser.parse_args(argv)
    command = f"python bench/prepare_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}"

    results = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-prepare-bench.") as tmp:
        work = Path(tmp)
        print("prepare-data on the standard library", flush=True)
        for tokenizer in ("byte", "bpe"):
            results.append(_run(tokenizer, "stdlib", "stdlib", work / "out", args.bpe_train_bytes))
        print(f"copying the standard library {COPIES} times", flush=True)
        _build_copies(work / "corpus")
        for tokenizer in ("byte",) if args.skip_bpe_x10 else ("byte", "bpe"):
            results.append(
                _run(
                    tokenizer,
                    "stdlib x10",
                    str(work / "corpus"),
                    work / "out",
                    args.bpe_train_bytes,
                )
            )

    markdown = _markdown(results, command, args.bpe_train_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    print()
    print(markdown)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
