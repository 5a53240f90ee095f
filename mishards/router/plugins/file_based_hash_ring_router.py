"""`FileBasedHashRingRouter`: files to read-only nodes on the original ketama ring."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from mishards.core.ring import RingCache


class FileBasedHashRingRouter:
    name = "FileBasedHashRingRouter"

    def __init__(self) -> None:
        self._rings = RingCache()

    @classmethod
    def create(cls, **_: object) -> FileBasedHashRingRouter:
        return cls()

    def assign(
        self, file_ids: Sequence[str], nodes: Collection[str], excluded: Collection[str] = ()
    ) -> dict[str, list[str]]:
        """Each file to one node of `nodes` not in `excluded`: its owner on the ring over all `nodes`,
        or the next distinct node after the excluded ones. Raises NoAvailableNode when none is left."""
        return self._rings.ring_for(nodes).assign(file_ids, excluded)
