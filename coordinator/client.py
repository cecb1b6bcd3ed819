"""Read a coordinator from Python: its runs, peers, metrics, evaluations, leaderboard
and checkpoints, over the public JSON API that the dashboard reads too.

Plain HTTP through httpx: no hivemind, no gRPC, nothing that joins the run
(``crowdtrain.node.join`` does that). Lists come back as :class:`Records`, a
list of dicts that ``.to_pandas()`` turns into a DataFrame when pandas is
installed. Checkpoints download with their sha256 checked before they take
their final name.
"""

from __future__ import annotations

import hashlib
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsIndex, overload

import httpx
from pydantic import TypeAdapter, ValidationError

from crowdtrain.protocol import api, transfer
from crowdtrain.protocol.errors import CrowdtrainError

if TYPE_CHECKING:
    import pandas

    from crowdtrain.model import GPT

# Columns of unix seconds; to_pandas() makes them timezone-aware timestamps.
TIME_COLUMNS = ("time", "last_seen", "registered_at", "created_at", "published_at")


class ClientError(CrowdtrainError):
    """The coordinator could not be reached, or refused or could not answer a request."""


class Records(list[dict[str, Any]]):
    """A list of records (dicts), oldest or best first as the route says.

    Use it as a list (a slice is Records too); ``records.to_pandas()`` gives a
    DataFrame with one column per key, unix-seconds columns (``time``,
    ``last_seen``…) as UTC timestamps.
    """

    @overload
    def __getitem__(self, index: SupportsIndex) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Records: ...

    def __getitem__(self, index: SupportsIndex | slice) -> dict[str, Any] | Records:
        if isinstance(index, slice):
            return Records(super().__getitem__(index))
        return super().__getitem__(index)

    def to_pandas(self) -> pandas.DataFrame:
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Records.to_pandas() needs pandas: `pip install pandas` (without it, "
                "the records are plain dicts in a list)"
            ) from None
        frame = pandas.DataFrame(list(self))
        for column in TIME_COLUMNS:
            if column in frame.columns:
                frame[column] = pandas.to_datetime(frame[column], unit="s", utc=True)
        return frame


class Client:
    """A coordinator's public API at ``url`` (the address its dashboard has).

    ``ca_cert``: a PEM file of the authority behind a private TLS certificate.
    Every method raises :class:`ClientError` with what went wrong and what to
    check; an unknown run's error names the runs the coordinator has.
    """

    def __init__(self, url: str, timeout_s: float = 30.0, ca_cert: str | Path | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ClientError(
                f"coordinator URL {url!r} must start with http:// or https:// "
                "(the address of its dashboard, e.g. http://127.0.0.1:8470)"
            )
        self.url = url.rstrip("/")
        verify: Any = True
        if ca_cert is not None:
            import ssl

            verify = ssl.create_default_context(cafile=str(ca_cert))
        self._http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout_s), verify=verify
        )

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reading

    def runs(self) -> Records:
        """Every run: id, step, tokens, tokens/s, validation loss, active peers, shards."""
        return Records(self._get(api.RUNS))

    def run(self, run: str) -> dict[str, Any]:
        """One run, its resolved spec included (``["spec"]``)."""
        found: dict[str, Any] = self._get(api.path(api.RUN, run_id=run), run=run)
        return found

    def peers(self, run: str) -> Records:
        """The run's peers: name, device, state, tokens, tokens/s, loss, step, verified credit."""
        return Records(self._get(api.path(api.PEERS, run_id=run), run=run))

    def metrics(self, run: str, since: float | datetime | None = None) -> Records:
        """The run over time, oldest first: ``time``, ``step``, ``num_tokens``,
        ``tokens_per_s``, ``num_peers``, sampled every few seconds while peers are live.
        ``since`` (unix seconds or a datetime) keeps only later samples."""
        params = {}
        if since is not None:
            params["since"] = since.timestamp() if isinstance(since, datetime) else float(since)
        return Records(self._get(api.path(api.RUN_METRICS, run_id=run), run=run, params=params))

    def evals(self, run: str) -> Records:
        """Validation loss over steps and tokens, oldest first."""
        return Records(self._get(api.path(api.EVALS, run_id=run), run=run))

    def leaderboard(self, run: str) -> Records:
        """Peers ranked by verified compute, with their flags."""
        return Records(self._get(api.path(api.LEADERBOARD, run_id=run), run=run))

    def checkpoints(self, run: str) -> Records:
        """The keeper's checkpoints, oldest step first; ``available`` ones can be downloaded."""
        return Records(self._get(api.path(api.CHECKPOINTS, run_id=run), run=run))

    # checkpoints out

    def download_checkpoint(
        self,
        run: str,
        step: int | None = None,
        dest: str | Path = ".",
        progress: bool = True,
    ) -> Path:
        """Download the keeper's checkpoint of ``step`` (None: the latest kept) into the
        folder ``dest``, as ``<run>-step-<step>.safetensors``; return its path.

        The bytes go to a temporary file beside it and take the final name only
        once their sha256 matches the coordinator's record, so a failed or
        tampered download leaves any file already there untouched. A connection
        that breaks mid-file is resumed where it stopped, a few times at most
        (:mod:`crowdtrain.protocol.transfer`). A file already there with the
        right sha256 is not downloaded again.
        """
        checkpoint = self._checkpoint(run, step)
        step = checkpoint.step
        folder = Path(dest).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClientError(f"cannot create folder {folder}: {e.strerror}") from None
        target = folder / f"{run}-step-{step:08d}.safetensors"
        expected = checkpoint.file_sha256
        if target.is_file() and _sha256_file(target) == expected:
            return target
        from tqdm.auto import tqdm

        bar: tqdm | None = None

        def shown(received: int, total: int | None) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(
                    total=total or checkpoint.num_bytes or None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"{run} step {step}",
                    disable=not progress,
                )
            bar.update(received - bar.n)

        url = self.url + api.path(api.CHECKPOINT_FILE, run_id=run, step=step)
        try:
            transfer.download(
                self._http,
                url,
                target,
                sha256=expected,
                max_bytes=checkpoint.num_bytes,
                progress=shown,
            )
        except transfer.TransferError as e:
            if e.received_sha256 is None:
                raise ClientError(str(e)) from None
            raise ClientError(
                f"the checkpoint of step {step} of run {run!r} from {self.url} has sha256 "
                f"{e.received_sha256[:16]}..., the coordinator's record says "
                f"{expected[:16]}...; refused it ({target} is untouched). Download it "
                "again; if it keeps failing, tell the coordinator's operator"
            ) from None
        finally:
            if bar is not None:
                bar.close()
        return target

    def load_model(
        self, run: str, step: int | None = None, dest: str | Path | None = None, device: str = "cpu"
    ) -> GPT:
        """The run's GPT with the keeper's checkpoint of ``step`` (None: the latest) loaded,
        in eval mode on ``device``. The file is downloaded (and checked) into ``dest``,
        or a temporary folder removed afterwards; its parameters are checked against
        the coordinator's record too."""
        from crowdtrain.model import GPT, GPTConfig, load_into, params_sha256

        info = self._parse(api.RunView, self.run(run), api.path(api.RUN, run_id=run))
        checkpoint = self._checkpoint(run, step)
        model = GPT(GPTConfig(**info.spec["model"]))
        with tempfile.TemporaryDirectory(prefix="crowdtrain-") as scratch:
            path = self.download_checkpoint(run, checkpoint.step, dest or scratch, progress=True)
            metadata = load_into(model, path)
        if metadata.get("spec_hash") not in (None, info.spec_hash):
            raise ClientError(
                f"checkpoint {path.name} was saved for another spec of run {run!r} "
                f"({metadata.get('spec_hash', '')[:16]}, the run's is {info.spec_hash[:16]})"
            )
        if params_sha256(model.state_dict()) != checkpoint.sha256:
            raise ClientError(
                f"the parameters in {path.name} do not match the coordinator's record of "
                f"step {checkpoint.step}; download it again"
            )
        return model.to(device).eval()

    # plumbing

    def _get(self, path: str, run: str | None = None, params: dict[str, Any] | None = None) -> Any:
        response = self._request(path, params)
        if response.status_code == 404 and run is not None:
            self._raise_unknown_run(run, response)
        if response.status_code != 200:
            raise ClientError(
                f"GET {self.url}{path} answered HTTP {response.status_code}: {_detail(response)}"
            )
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{self.url}{path} did not answer JSON; is {self.url} a crowdtrain coordinator?"
            ) from None

    def _request(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return self._http.get(path, params=params)
        except httpx.HTTPError as e:
            raise ClientError(
                f"cannot reach the coordinator at {self.url} ({type(e).__name__}: {e}); check "
                "the address and that `crowdtrain-coordinator serve` is running there"
            ) from None

    def _raise_unknown_run(self, run: str, response: httpx.Response) -> None:
        runs: list[api.RunHead] = self._parse(list[api.RunHead], self.runs(), api.RUNS)
        names = [r.id for r in runs]
        if run not in names:
            known = ", ".join(repr(n) for n in names) or "none yet"
            raise ClientError(f"no run {run!r} on the coordinator at {self.url}; its runs: {known}")
        raise ClientError(f"{self.url}: {_detail(response)}")

    def _parse(self, shape: Any, found: Any, path: str) -> Any:
        """``found`` (the JSON ``path`` answered) parsed with ``shape``, a protocol model or
        TypeAdapter; a :class:`ClientError` when it does not fit."""
        adapter = shape if isinstance(shape, TypeAdapter) else TypeAdapter(shape)
        try:
            return adapter.validate_python(found)
        except ValidationError as e:
            raise ClientError(
                f"{self.url}{path} answered JSON of another shape ({e.error_count()} "
                "errors); is this Client as new as the coordinator?"
            ) from None

    def _checkpoint(self, run: str, step: int | None) -> api.CheckpointInfo:
        listed = self.checkpoints(run)
        rows: list[api.CheckpointInfo] = self._parse(
            list[api.CheckpointInfo], listed, api.path(api.CHECKPOINTS, run_id=run)
        )
        available = [r for r in rows if r.available]
        if step is None:
            if not available:
                raise ClientError(
                    f"run {run!r} has no checkpoint to download yet: the coordinator's keeper "
                    "saves one every few minutes while peers train (see checkpoints())"
                )
            return available[-1]
        found = next((r for r in available if r.step == step), None)
        if found is None:
            kept = ", ".join(str(r.step) for r in available) or "none"
            raise ClientError(
                f"no checkpoint of step {step} of run {run!r} can be downloaded; steps kept: {kept}"
            )
        return found


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:200] or response.reason_phrase


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


__all__ = ["Client", "ClientError", "Records"]
