"""MilvusEngramStore: engrams in a Milvus collection through pymilvus' MilvusClient (the `milvus` extra).

Where the engrams live (`uri`):
- a local path ending in `.db` ("engrams.db", "runs/lander/engrams.db"): an embedded Milvus Lite
  database, created if missing. Milvus Lite keeps it as a *folder* of that name (not a single
  file); its parent folder is created too. One process opens it at a time. A relative path is
  relative to the current directory.
- a server or cluster URI: "http://host:19530", "https://...", "tcp://...", "unix:...", with
  `token` for authentication ("user:password", or an API key for Zilliz Cloud).

Reopening resumes: an existing collection of the same name is opened with every engram in it
(its fields and state_dim are checked); `drop_existing=True` starts from an empty collection.
`metadata()` / `set_metadata()` keep a small JSON dict beside the engrams (in the collection's
properties), so whoever wrote them can record what they mean (`resonant train` stores its
observation normaliser there).

Schema: id (INT64 primary key = insertion index), vector (FLOAT_VECTOR, state_dim), action (INT64),
outcome (FLOAT), episode_return (FLOAT). Index: FLAT (exact), IVF_FLAT or HNSW, all with L2.
Inserts go in batches of `insert_batch` rows; `close()` flushes.

Eviction needs each engram's id and outcome; the store mirrors those two columns in memory
(rebuilt with a query iterator on reopen) so choosing victims costs no round trip.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..extras import require
from ..types import ArrayLike, PathLike
from .store import EngramStore, Neighbours
from .validation import as_states, positive_int

INDEX_TYPES = {
    # index type -> (build params, search params)
    "FLAT": ({}, {}),
    "IVF_FLAT": ({"nlist": 128}, {"nprobe": 16}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128}),
}
MAX_TOPK = 16384  # Milvus' limit on k per search
SERVER_SCHEMES = ("http:", "https:", "tcp:", "unix:")
METADATA_PROPERTY = "resonant.metadata"
# Milvus Lite has no server-side MVCC timestamp, so every query iterator logs that it falls back
# to a client-side one (harmless, and it would print on every reopen); dropped at our call sites.
BENIGN_LOG_MESSAGES = ("mvccTs",)
PYMILVUS_ITERATOR_LOGGERS = ("pymilvus.client.iterator.query_iterator", "pymilvus.orm.iterator")


def milvus_uri(uri: PathLike) -> str:
    """Checks `uri` (see the module docstring) and creates a Milvus Lite database's parent folder."""
    uri = os.fspath(uri)
    if uri.startswith(SERVER_SCHEMES):
        return uri
    if not uri.endswith(".db"):
        raise ValueError(f"uri must be a local Milvus Lite path ending in .db or a server URI starting with "
                         f"{', '.join(SERVER_SCHEMES)}; got {uri!r}")
    if os.path.isfile(uri):
        raise ValueError(f"uri {uri!r} is a regular file; Milvus Lite keeps its database as a folder of that name")
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return uri


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in BENIGN_LOG_MESSAGES)


@contextmanager
def quiet_pymilvus() -> Iterator[None]:
    """Drops pymilvus' benign Milvus Lite warnings (BENIGN_LOG_MESSAGES) while our calls run."""
    loggers = [logging.getLogger(name) for name in PYMILVUS_ITERATOR_LOGGERS]
    benign = _DropBenign()
    for logger in loggers:
        logger.addFilter(benign)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(benign)


class MilvusEngramStore(EngramStore):
    def __init__(self, state_dim: int, num_actions: int, uri: PathLike = "engrams.db", *,
                 collection: str = "engrams", index_type: str = "FLAT", index_params: Optional[dict] = None,
                 search_params: Optional[dict] = None, capacity: Optional[int] = None, eviction: str = "oldest",
                 insert_batch: int = 10_000, drop_existing: bool = False, seed: Optional[int] = None,
                 token: str = ""):
        pymilvus = require("pymilvus", "milvus", "MilvusEngramStore")
        DataType, MilvusClient = pymilvus.DataType, pymilvus.MilvusClient
        uri = milvus_uri(uri)
        if not uri.startswith(SERVER_SCHEMES):
            require("milvus_lite", "milvus", f"MilvusEngramStore({uri!r}) (a Milvus Lite database)")

        self._configure(state_dim, num_actions, capacity, eviction, seed)
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {tuple(INDEX_TYPES)}, got {index_type!r}")
        if insert_batch < 1:
            raise ValueError(f"insert_batch must be >= 1, got {insert_batch}")
        build, search = INDEX_TYPES[index_type]
        self.index_type, self.insert_batch, self.collection = index_type, insert_batch, collection
        self._search_params = {"metric_type": "L2", "params": {**search, **(search_params or {})}}
        self.uri = uri
        self.client = MilvusClient(self.uri, token=token)
        if drop_existing and self.client.has_collection(collection):
            self.client.drop_collection(collection)
        if self.client.has_collection(collection):
            self._check_existing()
            self.client.load_collection(collection)
        else:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=state_dim)
            schema.add_field("action", DataType.INT64)
            schema.add_field("outcome", DataType.FLOAT)
            schema.add_field("episode_return", DataType.FLOAT)
            params = self.client.prepare_index_params()
            params.add_index(field_name="vector", index_type=index_type, metric_type="L2",
                             params={**build, **(index_params or {})})
            # Strong consistency: a search right after an insert sees it (the brain relies on that)
            self.client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")
        self._ids, self._outcomes = self._load_mirror()
        self._next_index = int(self._ids.max()) + 1 if len(self._ids) else 0
        self._closed = False

    def _check_existing(self) -> None:
        desc = self.client.describe_collection(self.collection)
        fields = {f["name"]: f for f in desc["fields"]}
        missing = {"id", "vector", "action", "outcome", "episode_return"} - fields.keys()
        if missing:
            raise ValueError(f"collection {self.collection!r} at {self.uri} lacks engram fields {sorted(missing)}")
        dim = int(fields["vector"].get("params", {}).get("dim", -1))
        if dim != self.state_dim:
            raise ValueError(f"collection {self.collection!r} at {self.uri} holds {dim}-dim states, "
                             f"not state_dim={self.state_dim}")

    def _load_mirror(self):
        ids, outcomes = [], []
        with quiet_pymilvus():
            it = self.client.query_iterator(self.collection, batch_size=10_000, filter="id >= 0",
                                            output_fields=["id", "outcome"])
            try:
                while True:
                    rows = it.next()
                    if not rows:
                        break
                    ids.extend(r["id"] for r in rows)
                    outcomes.extend(r["outcome"] for r in rows)
            finally:
                it.close()
        return np.asarray(ids, dtype=np.int64), np.asarray(outcomes, dtype=np.float32)

    def metadata(self) -> dict:
        """The JSON dict stored beside the engrams by `set_metadata` ({} if none)."""
        properties = self.client.describe_collection(self.collection).get("properties") or {}
        text = properties.get(METADATA_PROPERTY)
        if text is None:
            return {}
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"collection {self.collection!r} at {self.uri}: its {METADATA_PROPERTY} property is "
                             f"not a JSON object")
        return value

    def set_metadata(self, metadata: dict) -> None:
        """Stores `metadata` (a JSON-serialisable dict, replacing the previous one) with the collection."""
        self.client.alter_collection_properties(self.collection, properties={METADATA_PROPERTY: json.dumps(metadata)})

    def __len__(self) -> int:
        return len(self._ids)

    def _insert(self, states, actions, outcomes, episode_returns) -> None:
        n = states.shape[0]
        ids = np.arange(self._next_index, self._next_index + n, dtype=np.int64)
        vec, act, out, ret = (states.numpy(), actions.numpy(), outcomes.numpy(), episode_returns.numpy())
        for start in range(0, n, self.insert_batch):
            stop = min(n, start + self.insert_batch)
            rows = [{"id": int(ids[i]), "vector": vec[i].tolist(), "action": int(act[i]), "outcome": float(out[i]),
                     "episode_return": float(ret[i])} for i in range(start, stop)]
            self.client.insert(self.collection, rows)
        self._ids = np.concatenate([self._ids, ids])
        self._outcomes = np.concatenate([self._outcomes, out.astype(np.float32)])
        self._next_index += n

    def _eviction_view(self):
        return self._ids, self._outcomes

    def _evict(self, positions: np.ndarray) -> None:
        victims = self._ids[positions]
        for start in range(0, len(victims), self.insert_batch):
            self.client.delete(self.collection, ids=[int(i) for i in victims[start:start + self.insert_batch]])
        keep = np.ones(len(self._ids), dtype=bool)
        keep[positions] = False
        self._ids, self._outcomes = self._ids[keep], self._outcomes[keep]

    def search(self, states: ArrayLike, k: int, *, with_states: bool = False) -> Neighbours:
        k = positive_int(k, "k")
        if k > MAX_TOPK:
            raise ValueError(f"k must be <= {MAX_TOPK} for Milvus, got {k}")
        q = as_states(states, self.state_dim)
        Q = q.shape[0]
        index = torch.full((Q, k), -1, dtype=torch.int64)
        action = torch.full((Q, k), -1, dtype=torch.int64)
        outcome = torch.zeros(Q, k)
        distance = torch.full((Q, k), math.inf)
        state = torch.zeros(Q, k, self.state_dim) if with_states else None
        if Q and len(self):
            fields = ["action", "outcome"] + (["vector"] if with_states else [])
            hits = self.client.search(self.collection, data=q.numpy().tolist(), limit=min(k, len(self)),
                                      anns_field="vector", output_fields=fields,
                                      search_params=self._search_params)
            for row, row_hits in enumerate(hits):
                for j, h in enumerate(row_hits):
                    index[row, j] = h["id"]
                    action[row, j] = h["entity"]["action"]
                    outcome[row, j] = h["entity"]["outcome"]
                    distance[row, j] = math.sqrt(max(h["distance"], 0.0))  # Milvus L2 is squared
                    if with_states:
                        state[row, j] = torch.as_tensor(h["entity"]["vector"], dtype=torch.float32)
        return Neighbours(index=index, action=action, outcome=outcome, distance=distance, state=state)

    def flush(self) -> None:
        self.client.flush(self.collection)

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self.client.close()
            self._closed = True
