"""The coordinator's storage: SQLite in WAL mode, and the only place SQL lives.

Every write is one transaction with ``synchronous=FULL``: once a method
returns, the record survives a crash. Methods take and return plain rows
(dicts); the domain packages give them meaning. The schema, the connection
and transactions are in :mod:`base`; each kind of record has its own module
(:mod:`runs`, :mod:`ledger`, :mod:`trust`), and :class:`Store` puts them together.
"""

from __future__ import annotations

from crowdtrain.coordinator.store.base import DB_NAME, SCHEMA_VERSION, StoreBase, StoreError
from crowdtrain.coordinator.store.ledger import LedgerRecords
from crowdtrain.coordinator.store.runs import RunRecords
from crowdtrain.coordinator.store.trust import TrustRecords


class Store(TrustRecords, LedgerRecords, RunRecords, StoreBase):
    """One SQLite database in a coordinator's data folder.

    Safe to share between threads: calls are serialised by a lock, which
    costs little next to SQLite's own fsync per commit.
    """


__all__ = ["DB_NAME", "SCHEMA_VERSION", "Store", "StoreBase", "StoreError"]
