"""Milvus 0.9.1 validation rules, as pure functions that raise the matching `MilvusError`.

Shared by the node, which enforces them like a Milvus server, and the proxy, which must answer
bad input with the code a single Milvus server would send before it routes anything.
"""

from __future__ import annotations

import json
import re

from utils.errors import (
    IllegalArgument,
    IllegalCollectionName,
    IllegalDimension,
    IllegalIndexType,
    IllegalMetricType,
    IllegalTopK,
    MilvusError,
    PartitionError,
    UnexpectedError,
)
from utils.milvus_schema import CLIENT_INDEX_TYPES, METRIC_TYPES, is_binary

MAX_NAME_LENGTH = 255
MAX_DIMENSION = 32768
MAX_INDEX_FILE_SIZE_MB = 4096
MAX_TOPK = 2048
MAX_PARTITIONS = 4096
MAX_INSERT_BYTES = 256 * 1024 * 1024
DEFAULT_PARTITION_TAG = "_default"

_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def collection_name(name: str) -> None:
    if not name:
        raise IllegalCollectionName("Collection name should not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise IllegalCollectionName(f"The length of a collection name must be less than {MAX_NAME_LENGTH} characters")
    if not (name[0] == "_" or name[0].isascii() and name[0].isalpha()):
        raise IllegalCollectionName(f"The first character of a collection name must be an underscore or letter: {name}")
    if not _NAME_PATTERN.fullmatch(name):
        raise IllegalCollectionName(f"Collection name can only contain numbers, letters, and underscores: {name}")


def dimension(dim: int, metric: int) -> None:
    if dim <= 0 or dim > MAX_DIMENSION:
        raise IllegalDimension(
            f"Invalid collection dimension: {dim}. "
            f"The collection dimension must be within the range of 1 ~ {MAX_DIMENSION}"
        )
    if is_binary(metric) and dim % 8 != 0:
        raise IllegalDimension(
            f"Invalid collection dimension: {dim}. The collection dimension must be a multiple of 8 for binary metrics"
        )


def index_file_size(size_mb: int) -> None:
    if size_mb <= 0 or size_mb > MAX_INDEX_FILE_SIZE_MB:
        raise IllegalArgument(
            f"Invalid index file size: {size_mb}. "
            f"The index file size must be within the range of 1 ~ {MAX_INDEX_FILE_SIZE_MB}"
        )


def metric_type(metric: int) -> None:
    if metric not in METRIC_TYPES:
        raise IllegalMetricType(f"Invalid metric type: {metric}. Valid values are 1 (L2) ~ 7 (SUPERSTRUCTURE)")


def topk(k: int) -> None:
    if k <= 0 or k > MAX_TOPK:
        raise IllegalTopK(f"Invalid topk: {k}. The topk must be within the range of 1 ~ {MAX_TOPK}")


def index_type(kind: int) -> None:
    if kind not in CLIENT_INDEX_TYPES:
        raise IllegalIndexType(f"Invalid index type: {kind}")


def json_params(extra_params, what: str) -> dict:
    """The JSON object under key "params" of an `extra_params` list ({} when absent)."""
    for pair in extra_params:
        if pair.key == "params":
            try:
                value = json.loads(pair.value) if pair.value else {}
            except ValueError as exc:
                raise IllegalArgument(f"Invalid {what} params: {pair.value!r} is not valid JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise IllegalArgument(f"Invalid {what} params: {pair.value!r} is not a JSON object")
            return value
    return {}


def partition_tag(tag: str) -> str:
    """A tag as Milvus stores it: trimmed, non-empty, within the length limit; returns the trimmed tag."""
    trimmed = tag.strip()
    if not trimmed:
        raise PartitionError("Partition tag should not be empty")
    if len(trimmed) > MAX_NAME_LENGTH:
        raise PartitionError(
            f"Invalid partition tag: {trimmed}. "
            f"The length of a partition tag must be less than {MAX_NAME_LENGTH} characters"
        )
    return trimmed


def tag_selects(pattern: str, tag: str) -> bool:
    """A search tag selects a partition whose tag equals it or fully matches it as a regex."""
    if pattern == tag:
        return True
    try:
        return re.fullmatch(pattern, tag) is not None
    except re.error:
        return False


def file_ids(raw_ids: list[str], what: str = "file id", error: type[MilvusError] = UnexpectedError) -> list[int]:
    """`TableFiles.id` values sent as decimal strings; Milvus answers a non-numeric one with an error."""
    numbers = []
    for raw in raw_ids:
        if not raw.strip().isdigit():
            raise error(f"Invalid {what}: {raw!r} is not a number")
        numbers.append(int(raw))
    return numbers


def select_tables(collection_table_id: str, partitions: list[tuple[str, str]], tags: list[str]) -> list[str]:
    """The table ids a search with `tags` covers, by the server's rules.

    No tags: the collection and every partition. `_default` (trimmed) is the collection itself;
    any other tag selects partitions whose tag equals it or fully matches it as a regex. Tags that
    select nothing fail with a partition error, as on the server. `partitions` is (table_id, tag).
    """
    if not tags:
        return [collection_table_id] + [table_id for table_id, _ in partitions]
    chosen: dict[str, None] = {}
    for raw_tag in tags:
        tag = raw_tag.strip()
        if tag == DEFAULT_PARTITION_TAG:
            chosen[collection_table_id] = None
            continue
        for table_id, partition_tag in partitions:
            if tag_selects(tag, partition_tag):
                chosen[table_id] = None
    if not chosen:
        raise PartitionError(f"The specified partition does not exist: {', '.join(tags)}")
    return list(chosen)
