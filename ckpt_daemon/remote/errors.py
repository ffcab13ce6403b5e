"""What can go wrong with a replica target, as errors whose messages name the cause and the remedy
(and never a credential)."""

from __future__ import annotations

from ckpt_daemon.errors import EXIT_USAGE, CkptError


class RemoteError(CkptError):
    """A replica target could not do what was asked. `kind` names the class of problem for status."""

    kind = "error"


class RemoteUnreachable(RemoteError):
    kind = "unreachable"


class RemoteAuthError(RemoteError):
    kind = "credentials"
    exit_code = EXIT_USAGE


class RemoteSetupError(RemoteError):
    """The target is reachable but not usable as configured (no such bucket, a folder we cannot write)."""

    kind = "setup"
    exit_code = EXIT_USAGE


class RemoteNotFound(RemoteError):
    kind = "missing"


class RemoteConflict(RemoteError):
    """A create-only write found the object there already."""

    kind = "conflict"


class RemoteIntegrityError(RemoteError):
    """Bytes did not match their checksum (the server refused a part, or what came back differs)."""

    kind = "integrity"


class LocalChanged(RemoteError):
    """The local checkpoint's bytes no longer match its recorded checksums (damaged, rewritten or deleted
    while it was being read): it is not replicated."""

    kind = "local"


class Cancelled(RemoteError):
    """The daemon is stopping, or the replica's settings changed: the transfer stops where it is."""

    kind = "cancelled"
