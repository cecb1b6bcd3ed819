"""Sources read through Apache Arrow: Parquet files, ``datasets`` folders and hub datasets.

Owns everything that imports ``pyarrow`` or ``datasets`` (the optional
``corpus`` extra), importing them only when such a source is read, and
turning their absence into a :class:`DataError` that names the extra.
Knows nothing about finding sources or the text and JSON Lines readers:
:mod:`crowdtrain.coordinator.data.corpus` dispatches to it; what sources share
is in :mod:`crowdtrain.coordinator.data.documents`.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from crowdtrain.coordinator.data.documents import (
    DATASET_MARKERS,
    HUB_PREFIX,
    Fields,
    Progress,
    Skips,
    quote_names,
)
from crowdtrain.protocol.errors import DataError

EXTRA = "corpus"
"""The optional dependencies these sources need: ``pip install 'crowdtrain[corpus]'``."""

_PARQUET_BATCH_ROWS = 1024
_SPOOL_RECORD = struct.Struct("<QQ")  # index in the stream, UTF-8 bytes that follow


@contextmanager
def _needs(package: str, reading: str) -> Iterator[None]:
    """Turn a failed import of ``package`` in the block into one line naming the extra."""
    try:
        yield
    except ImportError as e:
        raise DataError(
            f"reading {reading} needs {package}: pip install 'crowdtrain[{EXTRA}]'"
        ) from e


@dataclass
class ParquetSource:
    """Rows of the column ``text_field``, read a batch at a time; keys are ``name:row``."""

    path: Path
    name: str
    size_bytes: int
    text_field: str

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        with _needs("pyarrow", "Parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

        if self.size_bytes == 0:
            skips.empty(str(self.path))
            return
        try:
            # Pre-buffering reads ahead across row groups: memory would grow with the file.
            parquet = pq.ParquetFile(self.path, pre_buffer=False)
        except (pa.ArrowException, OSError) as e:
            progress(self.size_bytes)
            skips.skip(
                "not Parquet", str(self.path), f"it is not a Parquet file ({e})", "remove it"
            )
            return
        schema = parquet.schema_arrow
        field = self.text_field
        if field not in schema.names:
            raise DataError(
                f"{self.path}: no column '{field}' (columns: {quote_names(schema.names)}); "
                "pass --text-field with the column that holds the text"
            )
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"{self.path}: column '{field}' holds {kind}, not text (columns: "
                f"{quote_names(schema.names)}); pass --text-field with a string column"
            )
        num_rows = max(parquet.metadata.num_rows, 1)
        row = done = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        skips.not_string(f"{self.path} row {row}", field, value)
                    else:
                        yield f"{self.name}:{row}", value
                    row += 1
                step = self.size_bytes * row // num_rows - done
                progress(step)
                done += step
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {self.path} near row {row}: {e}") from e
        progress(self.size_bytes - done)


class DatasetFolder:
    """A folder saved by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
    keys are ``folder:index`` (``folder/split:index`` for a dict)."""

    def __init__(self, path: Path, split: str, text_field: str) -> None:
        self.path = path
        self.split = split
        self.text_field = text_field
        # A dict keeps each split in a subfolder of its name.
        files = (path / split if (path / DATASET_MARKERS[0]).is_file() else path).glob("*.arrow")
        self.size_bytes: int | None = sum(f.stat().st_size for f in files if f.is_file())

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        with _needs("datasets", "a datasets folder"):
            import datasets
        with _needs("pyarrow", "a datasets folder"):
            import pyarrow as pa

        try:
            loaded = datasets.load_from_disk(str(self.path))
        except Exception as e:  # datasets raises many kinds for a broken folder
            raise DataError(
                f"{self.path} looks like a datasets folder but cannot be loaded ({e}); "
                "save it again with save_to_disk"
            ) from e
        name = self.path.resolve().name
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise DataError(
                    f"{self.path} has no split '{self.split}' (splits: {quote_names(loaded)}); "
                    "pass --split with one of them"
                )
            loaded = loaded[self.split]
            name = f"{name}/{self.split}"
        if not isinstance(loaded, datasets.Dataset):
            raise DataError(f"{self.path} is not a datasets folder of rows; save it again")
        _check_features(loaded.features, self.text_field, str(self.path))
        # Its Arrow files are read as streams, a batch at a time: datasets would map
        # them into memory, and the mapped pages count as ours.
        files = [item["filename"] for item in loaded.cache_files]
        index = 0
        for file in files:
            size = os.path.getsize(file)
            try:
                with pa.OSFile(file) as f, pa.ipc.open_stream(f) as reader:
                    for batch in reader:
                        for value in batch.column(self.text_field).to_pylist():
                            if isinstance(value, str):
                                yield f"{name}:{index}", value
                            else:
                                skips.not_string(f"{self.path} row {index}", self.text_field, value)
                            index += 1
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"cannot read {file} near row {index}: {e}") from e
            progress(size)
        if index != len(loaded):
            raise DataError(
                f"{self.path}: read {index} rows of {len(loaded)}; this datasets folder "
                "has a layout crowdtrain does not know, save it again with save_to_disk"
            )


class HubDataset:
    """A hub dataset streamed through ``datasets.load_dataset(..., streaming=True)``.

    The first read streams it and keeps its documents in an unnamed temporary
    file; later reads replay that file, so the hub is read once and every read
    sees the same documents. Keys are ``NAME/SPLIT:index``. Call :meth:`close`
    to drop the file.
    """

    size_bytes: int | None = None

    def __init__(self, name: str, split: str, text_field: str, spool_dir: Path) -> None:
        self.name = name
        self.split = split
        self.text_field = text_field
        self._spool_dir = spool_dir
        self._spool: IO[bytes] | None = None

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        prefix = f"{self.name}/{self.split}"
        if self._spool is not None:
            yield from _replay(self._spool, prefix, progress)
            return
        spool = tempfile.TemporaryFile(prefix=".crowdtrain-spool.", dir=self._spool_dir)
        try:
            for index, text in self._stream(skips):
                data = text.encode("utf-8", "surrogatepass")
                spool.write(_SPOOL_RECORD.pack(index, len(data)))
                spool.write(data)
                progress(len(data))
                yield f"{prefix}:{index}", text
        except BaseException:
            spool.close()
            raise
        self._spool = spool

    def _stream(self, skips: Skips) -> Iterator[tuple[int, str]]:
        with _needs("datasets", "a hub dataset"):
            import datasets

        source = f"{HUB_PREFIX}{self.name}"
        try:
            stream = datasets.load_dataset(self.name, split=self.split, streaming=True)
        except Exception as e:  # network, missing dataset or split: all the user's to fix
            raise DataError(
                f"cannot open {source} split '{self.split}' ({e}); check the name and split "
                f"(pass {source}:SPLIT or --split), or pass a folder made by save_to_disk"
            ) from e
        features = getattr(stream, "features", None)
        if features is not None:
            _check_features(features, self.text_field, source)
        fields = Fields(self.text_field, source)
        for index, record in enumerate(stream):
            if (text := fields.text(record, f"{source} row {index}", skips)) is not None:
                yield index, text
        fields.check()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def _replay(spool: IO[bytes], prefix: str, progress: Progress) -> Iterator[tuple[str, str]]:
    spool.seek(0)
    while header := spool.read(_SPOOL_RECORD.size):
        index, size = _SPOOL_RECORD.unpack(header)
        data = spool.read(size)
        progress(size)
        yield f"{prefix}:{index}", data.decode("utf-8", "surrogatepass")


def _check_features(features: Any, field: str, where: str) -> None:
    """Refuse a dataset whose ``field`` is missing or does not hold strings."""
    import datasets  # the callers imported it already

    if field not in features:
        raise DataError(
            f"{where}: no field '{field}' (fields: {quote_names(features)}); "
            "pass --text-field with the field that holds the text"
        )
    feature = features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(
            f"{where}: field '{field}' holds {feature}, not text "
            f"(fields: {quote_names(features)}); pass --text-field with a string field"
        )
