"""Type stub of the compiled merge kernel (_topk.c). Inputs per node are C-contiguous buffers
(numpy arrays: int64 ids, float32 distances) or lists of Python ints and floats; the kernel
checks every size and raises ValueError (TypeError for values of another type)."""

from typing import overload

@overload
def merge_rows(
    ids: tuple[object, ...], distances: tuple[object, ...], nq: int, width: int, descending: bool
) -> tuple[list[int], list[float]]: ...
@overload
def merge_rows(
    ids: tuple[object, ...],
    distances: tuple[object, ...],
    nq: int,
    width: int,
    descending: bool,
    out_ids: object,
    out_distances: object,
) -> None: ...
def decode_varints(data: bytes, start: int, stop: int, out: object) -> int: ...
