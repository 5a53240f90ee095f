"""Index files of a segment: build with faiss, persist atomically, search with Milvus' parameters.

One index file covers the rows of its segment's raw file in raw-file order, so a faiss label is a
row position: ids and the deletion bitmap come from the segment itself, and a deleted row is
excluded with a faiss selector (or fetched and dropped where faiss takes none, NSG). Every hit
is re-ranked on the raw vectors in float64 with ties by id, so distances are what the brute-force
path returns and approximate indexes (SQ8, PQ) fetch a few times topk candidates first.
Binary IVF assigns rows to Hamming k-means lists with faiss and ranks the probed lists exactly,
which serves every binary metric, not only Hamming. ANNOY (random projection trees) is built and
searched with the `annoy` package, one query at a time (it has no batch call).
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field

import annoy
import faiss
import numpy as np

from utils.errors import IllegalArgument
from utils.milvus_schema import IndexType, MetricType

from . import engine

IVF_TYPES = frozenset(
    {IndexType.IVF_FLAT, IndexType.IVF_SQ8, IndexType.IVF_SQ8H, IndexType.IVF_PQ, IndexType.BIN_IVF_FLAT}
)
EXACT_TYPES = frozenset({IndexType.FLAT, IndexType.BIN_FLAT})
# Candidates fetched per wanted hit before the exact re-ranking: quantized codes misorder neighbours.
REFINE_FACTOR = {IndexType.IVF_SQ8: 4, IndexType.IVF_PQ: 8}
ANNOY_SEED = 1  # fixed, so that a segment's trees (and its search results) do not vary between builds
ANNOY_MAX_SEARCH_K = (1 << 31) - 1  # the annoy binding takes a C int; a larger search_k cannot visit more


@dataclass
class LoadedIndex:
    """A segment's index in memory; `lists` maps rows to IVF lists for binary IVF."""

    engine_type: int
    index: object
    nbytes: int
    lists: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # NSG keeps search_L on the index


def _faiss_metric(metric: int) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == MetricType.IP else faiss.METRIC_L2


def _annoy_index(dimension: int, metric: int) -> annoy.AnnoyIndex:
    # Annoy's "euclidean" ranks as squared L2 does and "dot" as IP; distances are recomputed exactly.
    return annoy.AnnoyIndex(dimension, "dot" if metric == MetricType.IP else "euclidean")


def _build_annoy(metric: int, vectors: np.ndarray, n_trees: int) -> annoy.AnnoyIndex:
    index = _annoy_index(vectors.shape[1], metric)
    index.set_seed(ANNOY_SEED)
    for position, vector in enumerate(vectors.tolist()):  # annoy takes rows one by one only
        index.add_item(position, vector)
    index.build(n_trees, n_jobs=1)
    return index


def build(engine_type: int, metric: int, vectors: np.ndarray, params: dict) -> object:
    """Train and fill a faiss (or annoy) index over all rows of a segment (labels = row positions)."""
    n = vectors.shape[0]
    if engine_type == IndexType.ANNOY:
        return _build_annoy(metric, vectors, int(params["n_trees"]))
    if engine_type == IndexType.BIN_IVF_FLAT:
        bits = vectors.shape[1] * 8
        nlist = max(1, min(int(params["nlist"]), n))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
        index.train(vectors)
        index.add(vectors)
        return index
    dim = vectors.shape[1]
    fm = _faiss_metric(metric)
    if engine_type in (IndexType.IVF_FLAT, IndexType.IVF_SQ8, IndexType.IVF_PQ):
        nlist = max(1, min(int(params["nlist"]), n))
        quantizer = faiss.IndexFlatIP(dim) if fm == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
        if engine_type == IndexType.IVF_FLAT:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, fm)
        elif engine_type == IndexType.IVF_SQ8:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, fm)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, int(params["m"]), 8, fm)
    elif engine_type == IndexType.HNSW:
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), fm)
        index.hnsw.efConstruction = int(params["efConstruction"])
    elif engine_type == IndexType.RNSG:
        index = faiss.IndexNSGFlat(dim, int(params["out_degree"]), fm)
        index.GK = min(int(params["knng"]), n - 1)
        index.build_type = 0  # exact k-NN graph: faster than NN-descent at segment sizes
        index.nsg.L = int(params["search_length"])
        index.nsg.C = int(params["candidate_pool_size"])
    else:
        raise ValueError(f"engine type {engine_type} has no index to build")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.train(vectors)
    index.add(vectors)
    return index


def write(index: object, path: str) -> int:
    """Write an index file atomically (temp name, fsync, rename, fsync dir); returns its size."""
    temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if isinstance(index, annoy.AnnoyIndex):
            if not index.save(temp, prefault=False):
                raise OSError(f"annoy could not write {temp}")
            index.unload()  # save() maps the temp name; the file is read again under its final name
        elif isinstance(index, faiss.IndexBinary):
            faiss.write_index_binary(index, temp)
        else:
            faiss.write_index(index, temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return os.path.getsize(path)


def load(engine_type: int, path: str, dimension: int, metric: int) -> LoadedIndex:
    size = os.path.getsize(path)
    if engine_type == IndexType.ANNOY:
        index = _annoy_index(dimension, metric)
        if not index.load(path, prefault=False):
            raise OSError(f"annoy could not load {path}")
        return LoadedIndex(engine_type, index, size)
    if engine_type == IndexType.BIN_IVF_FLAT:
        index = faiss.read_index_binary(path)
        lists = np.empty(index.ntotal, dtype=np.int64)
        invlists = index.invlists
        for number in range(index.nlist):  # once per load, not per search
            count = invlists.list_size(number)
            if count:
                lists[faiss.rev_swig_ptr(invlists.get_ids(number), count)] = number
        return LoadedIndex(engine_type, index, size, lists)
    return LoadedIndex(engine_type, faiss.read_index(path), size)


def search(
    loaded: LoadedIndex,
    metric: int,
    queries: np.ndarray,
    vectors: np.ndarray,
    row_ids: np.ndarray,
    deleted: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate hits of `queries` in one indexed segment, with the search params: (ids, exact float64
    distances), nq x c, unordered, id -1 for no hit. The caller ranks all segments' candidates at once."""
    if loaded.engine_type == IndexType.BIN_IVF_FLAT:
        return _search_binary_ivf(loaded, metric, queries, vectors, row_ids, deleted, topk, params)
    if loaded.engine_type == IndexType.ANNOY:
        return _search_annoy(loaded, metric, queries, vectors, row_ids, deleted, topk, params)
    n = vectors.shape[0]
    dead = int(np.count_nonzero(deleted))
    fetch = min(n, topk * REFINE_FACTOR.get(loaded.engine_type, 1))
    queries32 = np.ascontiguousarray(queries, dtype=np.float32)
    selector, bitmap = None, None
    if dead:
        bitmap = np.packbits(~deleted, bitorder="little")
        selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
    index = loaded.index
    if loaded.engine_type in IVF_TYPES:
        nprobe = min(int(params.get("nprobe", 16)), index.nlist)
        _, found = index.search(queries32, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe, sel=selector))
    elif loaded.engine_type == IndexType.HNSW:
        ef = max(int(params.get("ef", 64)), fetch)
        _, found = index.search(queries32, fetch, params=faiss.SearchParametersHNSW(efSearch=ef, sel=selector))
    else:  # NSG: no selector support, and search_L lives on the index
        with loaded.lock:
            index.nsg.search_L = max(int(params.get("search_length", 45)), fetch)
            _, found = index.search(queries32, min(n, fetch + dead))
        found = np.where((found >= 0) & deleted[np.maximum(found, 0)], -1, found)
    del bitmap  # kept alive until faiss is done with the selector
    candidate_ids = np.where(found >= 0, row_ids[np.maximum(found, 0)], -1)
    return candidate_ids, engine.exact_distances(metric, queries, vectors, found)


def _search_annoy(
    loaded: LoadedIndex,
    metric: int,
    queries: np.ndarray,
    vectors: np.ndarray,
    row_ids: np.ndarray,
    deleted: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """`search_k` nodes visited per query (Milvus' parameter, passed through); annoy cannot skip
    deleted rows, so as many more neighbours are fetched as the segment has deleted rows."""
    n = vectors.shape[0]
    fetch = min(n, topk + int(np.count_nonzero(deleted)))
    search_k = min(int(params["search_k"]), ANNOY_MAX_SEARCH_K)
    found = np.full((queries.shape[0], fetch), -1, dtype=np.int64)
    with loaded.lock:  # one search per index at a time: annoy's object is not documented thread-safe
        for row, query in enumerate(np.asarray(queries, dtype=np.float32).tolist()):
            neighbours = loaded.index.get_nns_by_vector(query, fetch, search_k)
            found[row, : len(neighbours)] = neighbours
    found = np.where((found >= 0) & deleted[np.maximum(found, 0)], -1, found)
    candidate_ids = np.where(found >= 0, row_ids[np.maximum(found, 0)], -1)
    return candidate_ids, engine.exact_distances(metric, queries, vectors, found)


def _search_binary_ivf(
    loaded: LoadedIndex,
    metric: int,
    queries: np.ndarray,
    vectors: np.ndarray,
    row_ids: np.ndarray,
    deleted: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Probe `nprobe` Hamming lists per query, then rank their rows exactly in the collection's metric."""
    index = loaded.index
    nprobe = min(int(params.get("nprobe", 16)), index.nlist)
    _, probed = index.quantizer.search(np.ascontiguousarray(queries), nprobe)
    chosen_lists = np.zeros((queries.shape[0], index.nlist), dtype=bool)
    chosen_lists[np.arange(queries.shape[0])[:, None], np.maximum(probed, 0)] = True
    columns = np.flatnonzero(chosen_lists.any(axis=0)[loaded.lists] & ~deleted)
    dist = engine.distances(metric, queries, vectors[columns])
    outside = ~chosen_lists[:, loaded.lists[columns]]
    candidate_ids = np.broadcast_to(row_ids[columns], dist.shape)
    return np.where(outside, -1, candidate_ids), dist


# ---------------------------------------------------------------------------------- validation
PQ_M_VALUES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
INT64_MAX = (1 << 63) - 1


def check_range(params: dict, key: str, low: int, high: int) -> int:
    """Milvus' CheckParameterRange: the key must be present and an integer within [low, high]."""
    if key not in params:
        raise IllegalArgument(f"Parameter list must contain: {key}")
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise IllegalArgument(f"Invalid {key}: {value!r} is not an integer")
    if value < low or value > high:
        raise IllegalArgument(f"Invalid {key} value: {value}. Valid range is [{low}, {high}]")
    return value


def check_index_params(engine_type: int, dimension: int, params: dict) -> None:
    """CreateIndex parameters for an engine type (docs/semantics.md)."""
    if engine_type in IVF_TYPES:
        check_range(params, "nlist", 1, 999999)
    if engine_type == IndexType.IVF_PQ:
        m = check_range(params, "m", 1, max(PQ_M_VALUES))
        if m not in PQ_M_VALUES or dimension % m:
            raise IllegalArgument(
                f"Invalid m: {m}. m must be one of {list(PQ_M_VALUES)} and divide the dimension ({dimension})"
            )
    elif engine_type == IndexType.RNSG:
        check_range(params, "search_length", 10, 300)
        check_range(params, "out_degree", 5, 300)
        check_range(params, "candidate_pool_size", 50, 1000)
        check_range(params, "knng", 5, 300)
    elif engine_type == IndexType.HNSW:
        check_range(params, "M", 5, 48)
        check_range(params, "efConstruction", 100, 500)
    elif engine_type == IndexType.ANNOY:
        check_range(params, "n_trees", 1, 1024)


def check_search_params(engine_type: int, topk: int, params: dict) -> None:
    """Search parameters against the collection's current index type; FLAT takes any."""
    if engine_type in IVF_TYPES:
        check_range(params, "nprobe", 1, 999999)
    elif engine_type == IndexType.HNSW:
        check_range(params, "ef", topk, 4096)
    elif engine_type == IndexType.RNSG:
        check_range(params, "search_length", 10, 300)
    elif engine_type == IndexType.ANNOY:
        check_range(params, "search_k", topk, INT64_MAX)
