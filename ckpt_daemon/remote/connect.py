"""From config.yaml's `replicas:` to a connected store, and the two commands a person runs by hand:
`ckpt-daemon list --remote` and `ckpt-daemon restore --from URL [latest|best|STEP]`."""

from __future__ import annotations

import logging
from typing import Callable, Optional

from ckpt_daemon.remote.errors import RemoteSetupError
from ckpt_daemon.remote.store import Store, Throttle, open_store
from ckpt_daemon.remote.target import CredentialsError, parse_url, read_credentials_file


def store_for(cfg, r, warn: Callable[[str], None] = lambda s: None) -> Store:
    """The client of the replica `r` of `cfg`, with its credentials (credentials_file, else the AWS_*
    environment). Raises RemoteSetupError for a credentials file that cannot be used."""
    target = cfg.replica_target(r)
    creds = None
    if r.credentials_file is not None:
        path = cfg.resolve_path(r.credentials_file)
        try:
            creds, warnings = read_credentials_file(path)
        except CredentialsError as exc:
            raise RemoteSetupError(f"The replica {target.url} cannot use its credentials: {exc}. Fix the file (two "
                                   "lines: AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=...); checkpoints stay local "
                                   "meanwhile.") from None
        for w in warnings:
            warn(w)
    if target.kind == "s3":
        for name in ("botocore", "boto3", "urllib3", "s3transfer"):  # their debug lines carry request headers
            logging.getLogger(name).setLevel(logging.WARNING)
    return open_store(target, r.endpoint_url, r.region, creds, pool=r.parallel)


def replica_for(cfg, url: str):
    """The configured replica whose target is `url` (its endpoint and credentials), else one made from the
    url alone (AWS S3 with the AWS_* environment, or a folder)."""
    from ckpt_daemon.config import ReplicaConfig

    want = parse_url(url, cfg.base_dir).url
    for r in cfg.replicas:
        if cfg.replica_target(r).url == want:
            return r
    return ReplicaConfig(url=url)


def transfer_for(r, cancel=None):
    from ckpt_daemon.remote.upload import Transfer

    return Transfer(parallel=r.parallel, part_size=r.part_size_mb << 20, throttle=Throttle(None, cancel))


def restore_from(cfg, url: str, which: str = "latest", note: Callable[[str], None] = lambda s: None) -> tuple[Optional[str], list[str]]:
    """`ckpt-daemon restore --from URL WHICH`: download, verify and commit one replica into checkpoints.dir
    (never over an existing name). Returns (the restored name or None, messages)."""
    from ckpt_daemon.errors import CheckpointError, UsageError
    from ckpt_daemon.remote import download, listing
    from ckpt_daemon.store import catalog as cat

    r = replica_for(cfg, url)
    store = store_for(cfg, r, warn=note)
    rc = listing.scan_remote(store)
    t = transfer_for(r)
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        path, notes = download.restore(store, rc, which, cfg.checkpoint_dir, cfg.checkpoints.pattern, t,
                                       cfg.trainer.best_metric, cfg.trainer.best_mode, note=note)
    except ValueError as exc:
        raise UsageError(f"Nothing to restore: {exc}. `ckpt-daemon list --remote` shows what {rc.url} holds.") from None
    finally:
        t.close()
    lines = [f"passed over {n}" for n in notes]
    if path is None:
        raise CheckpointError(f"No replica of {which!r} at {rc.url} could be restored: {'; '.join(notes)}. Nothing was "
                              "changed locally.")
    lines.append(f"restored {path.name} from {rc.url} (downloaded, every checksum verified, committed)")
    newest = cat.newest_valid_rel(cfg)
    if newest == path.name:
        lines.append(f"training will resume from {newest} (the newest valid checkpoint)")
    elif newest:
        lines.append(f"training resumes from the newest valid checkpoint, {newest}; to continue from {path.name} "
                     f"instead, move the newer checkpoints out of {cfg.checkpoint_dir}")
    return path.name, lines
