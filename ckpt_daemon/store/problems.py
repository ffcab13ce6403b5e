"""What is wrong with a checkpoint's bytes, typed: a `Problem` is a `Kind` and the message shown to users.

Readers (torchzip, the manifest and sidecar checks) say which kind of problem they found when they find
it; callers map the kind to a catalog status and never read the message to classify it (a message holds
untrusted names: an entry called "CRC" must not make a file corrupt). The kinds are the catalog's
statuses other than complete (see catalog.py) and compare equal to their strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_daemon.store.names import Status, StrEnum


class Kind(StrEnum):
    INCOMPLETE = "incomplete"    # truncated, a part missing, structure inconsistent: a save that never finished
    CORRUPT = "corrupt"          # a checksum or CRC fails: damaged after it was written
    INVALID = "invalid"          # not what its name says: not a torch.save file, more work than any checkpoint needs
    UNREADABLE = "unreadable"    # not looked at, or not told apart in time: never taken for damage
    IN_PROGRESS = "in_progress"  # still being written

    @property
    def status(self) -> Status:
        return Status(self.value)


TRUNCATED = Kind.INCOMPLETE  # a file cut short is an incomplete save


@dataclass(frozen=True)
class Problem:
    kind: Kind
    message: str

    @property
    def status(self) -> Status:
        return self.kind.status

    def __str__(self) -> str:
        return self.message
