"""Type stub of the compiled merge kernel (_topk.c). Arguments are C-contiguous buffers (numpy
arrays): int64 ids and float32 distances; the kernel checks their sizes and raises ValueError."""

def merge_rows(
    ids: tuple[object, ...],
    distances: tuple[object, ...],
    nq: int,
    width: int,
    descending: bool,
    out_ids: object,
    out_distances: object,
) -> None: ...
