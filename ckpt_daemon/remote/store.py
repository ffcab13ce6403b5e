"""The object stores a replica lives in, behind one small interface: an S3 bucket (boto3, imported only
here and only when an s3:// replica is used) or a folder (a local disk or a network mount).

The interface is what verified, resumable transfers need and nothing more: objects written whole
(optionally create-only: the commit marker), multipart uploads whose parts carry a SHA-256 the server
checks (listed, resumed and aborted), ranged reads, listing and deletion. A folder emulates it with
temp files renamed into place; its "server checksum" is a SHA-256 of the bytes read back from the
folder after an fsync (the page cache dropped first), so a network mount that lost or changed bytes
is caught the same way a server that did would be.

boto3 was chosen over obstore and s3fs: it is the one client with the full multipart API (list, resume,
abort), explicit SHA-256 part checksums and retries that survive a short outage (see README).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ckpt_daemon.fsutil import fsync_dir
from ckpt_daemon.remote.errors import (
    Cancelled,
    RemoteAuthError,
    RemoteConflict,
    RemoteError,
    RemoteIntegrityError,
    RemoteNotFound,
    RemoteSetupError,
    RemoteUnreachable,
)
from ckpt_daemon.remote.target import Credentials, Target

READ_CHUNK = 1 << 20
THROTTLE_SLICE = 256 << 10
MAX_LIST = 1_000_000  # objects under one prefix; far more than any run's replicas


@dataclass
class ObjInfo:
    key: str
    size: int
    etag: str = ""
    sha256: Optional[str] = None  # the server's SHA-256 checksum (base64; composite ones end in -N)
    metadata: dict = field(default_factory=dict)
    mtime: float = 0.0


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def composite_sha256(part_digests: list[bytes]) -> str:
    """S3's checksum of a multipart object: SHA-256 of the parts' SHA-256 digests, then -<parts>."""
    return f"{b64(hashlib.sha256(b''.join(part_digests)).digest())}-{len(part_digests)}"


class Throttle:
    """A token bucket shared by every transfer of one target: at most `rate` bytes per second on
    average (bursts of one second). rate None: no cap. Waits wake early when `cancel` is set."""

    def __init__(self, rate: Optional[float], cancel: Optional[threading.Event] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.cancel = cancel or threading.Event()
        self.clock = clock
        self.lock = threading.Lock()
        self.tokens = rate or 0.0
        self.t = clock()

    def take(self, n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled("the transfer was cancelled (the daemon is stopping or the replica's settings changed)")
        if not self.rate:
            return
        with self.lock:
            now = self.clock()
            self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0 and self.cancel.wait(wait):
            raise Cancelled("the transfer was cancelled (the daemon is stopping or the replica's settings changed)")


class _Body(io.RawIOBase):
    """A part's bytes as the seekable stream botocore sends (and rewinds for a retry), paced by the
    throttle as it is read."""

    def __init__(self, data: memoryview, throttle: Throttle):
        self.data, self.throttle, self.pos = data, throttle, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.data)}[whence]
        self.pos = max(0, min(len(self.data), base + offset))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = len(self.data) - self.pos
        n = left if n is None or n < 0 else min(n, left)
        n = min(n, THROTTLE_SLICE)
        if n <= 0:
            return b""
        self.throttle.take(n)
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)

    def __len__(self) -> int:
        return len(self.data)


class Store:
    """The interface both stores implement (see the module docstring)."""

    target: Target
    resumable = False

    def check(self) -> None: ...
    def head(self, key: str) -> Optional[ObjInfo]: ...
    def get_bytes(self, key: str, limit: int) -> bytes: ...
    def put_bytes(self, key: str, data: bytes, sha256: Optional[bytes] = None, metadata: Optional[dict] = None,
                  create_only: bool = False, throttle: Optional[Throttle] = None) -> ObjInfo: ...
    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]: ...
    def list(self, prefix: str) -> Iterator[ObjInfo]: ...
    def delete(self, keys: list[str]) -> None: ...
    def start_upload(self, key: str, metadata: dict) -> str: ...
    def upload_part(self, key: str, uid: str, number: int, offset: int, data: memoryview, sha256: bytes,
                    throttle: Throttle) -> str: ...
    def uploaded_parts(self, key: str, uid: str) -> dict[int, tuple[int, str]]: ...
    def complete_upload(self, key: str, uid: str, parts: list[tuple[int, str, str]], size: int,
                        part_size: int) -> ObjInfo: ...
    def abort_upload(self, key: str, uid: str) -> None: ...
    def open_uploads(self, prefix: str) -> list[tuple[str, str, float]]: ...


# ---------------------------------------------------------------------------------------------- S3
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
               "AuthorizationHeaderMalformed", "InvalidSecurity", "TokenRefreshRequired", "AllAccessDisabled", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_DIGEST_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}


class S3Store(Store):
    resumable = True

    def __init__(self, target: Target, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 credentials: Optional[Credentials] = None, pool: int = 8, attempts: int = 6):
        import boto3  # here only: the daemon loads it when an s3:// replica is configured, never otherwise
        from botocore.config import Config as BotoConfig

        self.target = target
        self.where = f"{target.url}" + (f" at {endpoint_url}" if endpoint_url else "")
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key if credentials else None,
            aws_secret_access_key=credentials.secret_key if credentials else None,
            aws_session_token=credentials.session_token if credentials else None,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.client = session.client("s3", endpoint_url=endpoint_url, config=BotoConfig(
            # standard retries back off up to ~20 s in all: a server restarting or a short outage is ridden out
            retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60,
            max_pool_connections=max(10, pool + 4), user_agent_extra="ckpt-daemon",
            # our own SHA-256 goes with every part; botocore need not hash the body a second time
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            s3={"addressing_style": "path" if endpoint_url else "auto", "payload_signing_enabled": False}))
        self.bucket = target.bucket

    # -- errors ------------------------------------------------------------------------------------
    def _err(self, exc: BaseException, what: str) -> RemoteError:
        from botocore import exceptions as bx

        if isinstance(exc, RemoteError):
            return exc
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "?")
            msg = str(err.get("Message") or "")[:200]
            if code in _AUTH_CODES:
                return RemoteAuthError(
                    f"{self.where} refused the credentials while trying to {what} ({code}: {msg}). Check the keys in "
                    "the replica's credentials_file (or the AWS_* environment) and that they may read and write the "
                    "bucket; checkpoints stay local meanwhile and replication retries by itself.")
            if code == "NoSuchBucket":
                return RemoteSetupError(f"The bucket {self.bucket} does not exist at {self.where}. Create it (e.g. `aws "
                                        "s3 mb s3://" + self.bucket + "`), or fix the replica's url; checkpoints stay "
                                        "local meanwhile.")
            if code in _MISSING_CODES:
                return RemoteNotFound(f"{what}: not found at {self.where} ({code})")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return RemoteConflict(f"{what}: the object already exists at {self.where} ({code})")
            if code in _DIGEST_CODES:
                return RemoteIntegrityError(f"{self.where} refused the bytes sent to {what}: they did not match their "
                                            f"checksum ({code}: {msg}); it is sent again.")
            return RemoteError(f"{self.where} failed to {what} ({code}: {msg}).")
        if isinstance(exc, bx.NoCredentialsError) or isinstance(exc, bx.PartialCredentialsError):
            return RemoteAuthError(f"No credentials for {self.where}: set the replica's credentials_file (a file of "
                                   "AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines) or the AWS_* environment "
                                   "of the daemon.")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError, bx.HTTPClientError, bx.ResponseStreamingError, OSError)):
            return RemoteUnreachable(f"{self.where} could not be reached to {what} ({type(exc).__name__}: "
                                     f"{str(exc)[:160]}). Replication retries by itself; checkpoints stay local meanwhile.")
        if isinstance(exc, bx.BotoCoreError):
            return RemoteError(f"{self.where} failed to {what} ({type(exc).__name__}: {str(exc)[:160]}).")
        raise exc

    def _call(self, what: str, fn, **kw):
        try:
            return fn(Bucket=self.bucket, **kw)
        except Exception as exc:  # mapped to the errors above; anything else is a bug and is raised as it is
            raise self._err(exc, what) from None

    # -- objects -----------------------------------------------------------------------------------
    def check(self) -> None:
        self._call("open the bucket", self.client.head_bucket)

    def head(self, key: str) -> Optional[ObjInfo]:
        try:
            r = self._call(f"look at {key}", self.client.head_object, Key=key, ChecksumMode="ENABLED")
        except RemoteNotFound:
            return None
        return ObjInfo(key, int(r.get("ContentLength", 0)), str(r.get("ETag", "")).strip('"'), r.get("ChecksumSHA256"),
                       dict(r.get("Metadata") or {}), _ts(r.get("LastModified")))

    def get_bytes(self, key: str, limit: int) -> bytes:
        r = self._call(f"read {key}", self.client.get_object, Key=key)
        if int(r.get("ContentLength", 0)) > limit:
            r["Body"].close()
            raise RemoteIntegrityError(f"{key} at {self.where} is larger than the {limit} bytes such an object may have")
        try:
            return r["Body"].read(limit + 1)[:limit + 1]
        except Exception as exc:
            raise self._err(exc, f"read {key}") from None

    def put_bytes(self, key: str, data: bytes, sha256: Optional[bytes] = None, metadata: Optional[dict] = None,
                  create_only: bool = False, throttle: Optional[Throttle] = None) -> ObjInfo:
        sha256 = sha256 or hashlib.sha256(data).digest()
        kw = {"IfNoneMatch": "*"} if create_only else {}
        r = self._call(f"write {key}", self.client.put_object, Key=key, Body=_Body(memoryview(data), throttle or Throttle(None)),
                       ContentLength=len(data), ChecksumSHA256=b64(sha256), Metadata=metadata or {}, **kw)
        got = r.get("ChecksumSHA256")
        if got is not None and got != b64(sha256):
            raise RemoteIntegrityError(f"{self.where} stored {key} with SHA-256 {got}, not the {b64(sha256)} sent")
        return ObjInfo(key, len(data), str(r.get("ETag", "")).strip('"'), got)

    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        r = self._call(f"read {key}", self.client.get_object, Key=key, Range=f"bytes={start}-{start + length - 1}")
        body = r["Body"]
        try:
            got = 0
            while got < length:
                try:
                    b = body.read(min(READ_CHUNK, length - got))
                except Exception as exc:
                    raise self._err(exc, f"read {key}") from None
                if not b:
                    raise RemoteUnreachable(f"{key} at {self.where} ended after {start + got} bytes, short of "
                                            f"{start + length}: the connection broke; it is read again")
                got += len(b)
                yield b
        finally:
            body.close()

    def list(self, prefix: str) -> Iterator[ObjInfo]:
        token, n = None, 0
        while True:
            kw = {"Prefix": prefix, "MaxKeys": 1000, **({"ContinuationToken": token} if token else {})}
            r = self._call(f"list {prefix or 'the bucket'}", self.client.list_objects_v2, **kw)
            for o in r.get("Contents") or []:
                n += 1
                if n > MAX_LIST:
                    return
                yield ObjInfo(str(o["Key"]), int(o.get("Size", 0)), str(o.get("ETag", "")).strip('"'),
                              mtime=_ts(o.get("LastModified")))
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            if len(batch) == 1:
                self._call(f"delete {batch[0]}", self.client.delete_object, Key=batch[0])
                continue
            r = self._call(f"delete {len(batch)} objects", self.client.delete_objects,
                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errs = [e for e in r.get("Errors") or [] if e.get("Code") not in ("NoSuchKey",)]
            if errs:
                raise RemoteError(f"{self.where} did not delete {errs[0].get('Key')} ({errs[0].get('Code')}: "
                                  f"{str(errs[0].get('Message'))[:160]}) and {len(errs) - 1} more")

    # -- multipart ---------------------------------------------------------------------------------
    def start_upload(self, key: str, metadata: dict) -> str:
        r = self._call(f"start uploading {key}", self.client.create_multipart_upload, Key=key,
                       ChecksumAlgorithm="SHA256", Metadata=metadata)
        return str(r["UploadId"])

    def upload_part(self, key: str, uid: str, number: int, offset: int, data: memoryview, sha256: bytes,
                    throttle: Throttle) -> str:
        r = self._call(f"upload part {number} of {key}", self.client.upload_part, Key=key, UploadId=uid,
                       PartNumber=number, Body=_Body(data, throttle), ContentLength=len(data), ChecksumSHA256=b64(sha256))
        got = r.get("ChecksumSHA256")
        if got is not None and got != b64(sha256):
            raise RemoteIntegrityError(f"{self.where} stored part {number} of {key} with SHA-256 {got}, not the one sent")
        return str(r.get("ETag", "")).strip('"')

    def uploaded_parts(self, key: str, uid: str) -> dict[int, tuple[int, str]]:
        out: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            r = self._call(f"list the parts of {key}", self.client.list_parts, Key=key, UploadId=uid,
                           PartNumberMarker=marker, MaxParts=1000)
            for p in r.get("Parts") or []:
                out[int(p["PartNumber"])] = (int(p.get("Size", -1)), str(p.get("ETag", "")).strip('"'))
            if not r.get("IsTruncated") or len(out) > 10_000:
                return out
            marker = int(r.get("NextPartNumberMarker") or 0)

    def complete_upload(self, key: str, uid: str, parts: list[tuple[int, str, str]], size: int,
                        part_size: int) -> ObjInfo:
        self._call(f"finish uploading {key}", self.client.complete_multipart_upload, Key=key, UploadId=uid,
                   MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e, "ChecksumSHA256": c} for n, e, c in parts]})
        info = self.head(key)
        if info is None:
            raise RemoteIntegrityError(f"{key} is not at {self.where} after its upload was completed")
        return info

    def abort_upload(self, key: str, uid: str) -> None:
        try:
            self._call(f"abort the upload of {key}", self.client.abort_multipart_upload, Key=key, UploadId=uid)
        except RemoteNotFound:
            pass

    def open_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        kmark = umark = None
        while True:
            kw = {"Prefix": prefix, **({"KeyMarker": kmark} if kmark else {}), **({"UploadIdMarker": umark} if umark else {})}
            r = self._call("list unfinished uploads", self.client.list_multipart_uploads, **kw)
            for u in r.get("Uploads") or []:
                out.append((str(u["Key"]), str(u["UploadId"]), _ts(u.get("Initiated"))))
            if not r.get("IsTruncated") or len(out) > 100_000:
                return out
            kmark, umark = r.get("NextKeyMarker"), r.get("NextUploadIdMarker")


def _ts(v) -> float:
    try:
        return float(v.timestamp())
    except (AttributeError, TypeError, ValueError, OverflowError, OSError):
        return 0.0


# ------------------------------------------------------------------------------------------ folder
UPLOAD_SUFFIX = ".upload"


class FolderStore(Store):
    """A replica folder (another disk, an NFS or SMB mount). The folder itself must exist: an unmounted
    share's empty mount point must never be mistaken for the share (replicas would land on the local disk)."""

    def __init__(self, target: Target):
        self.target = target
        self.root = Path(target.folder)
        self.where = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise RemoteError(f"{key[:80]!r} is not a key of ours")
        p = self.root
        for part in parts[:-1]:  # never through a symlink planted in the replica folder
            p = p / part
            if p.is_symlink():
                raise RemoteSetupError(f"{p} in the replica folder is a symlink; ckpt-daemon never writes, reads or "
                                       "deletes through one. Move it away.")
        return p / parts[-1]

    def _io(self, exc: OSError, what: str) -> RemoteError:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RemoteSetupError(f"The replica folder {self.root} cannot be written ({exc.strerror}) while trying to "
                                    f"{what}. Give the daemon's user write access (or remount it read-write).")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RemoteError(f"The replica folder {self.root} is full ({exc.strerror}) while trying to {what}. Free "
                               "space there or tighten the replica's retention; checkpoints stay local meanwhile.")
        return RemoteUnreachable(f"The replica folder {self.root} failed while trying to {what} "
                                 f"({exc.strerror or exc}). Replication retries by itself.")

    def check(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise RemoteSetupError(f"The replica folder {self.root} does not exist. Create it (or mount the network "
                                   "share there); ckpt-daemon never creates it itself, so that an unmounted share is "
                                   "not mistaken for an empty one.") from None
        except OSError as exc:
            raise self._io(exc, "open it") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RemoteSetupError(f"The replica url {self.root} is not a folder.")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise RemoteSetupError(f"The replica folder {self.root} is not writable by this user.")

    def head(self, key: str) -> Optional[ObjInfo]:
        try:
            st = os.lstat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io(exc, f"look at {key}") from None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjInfo(key, st.st_size, mtime=st.st_mtime)

    def _open_read(self, key: str) -> int:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise RemoteNotFound(f"{key} is not in {self.root}") from None
        except OSError as exc:
            raise self._io(exc, f"read {key}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RemoteNotFound(f"{key} in {self.root} is not a regular file")
        return fd

    def get_bytes(self, key: str, limit: int) -> bytes:
        fd = self._open_read(key)
        try:
            if os.fstat(fd).st_size > limit:
                raise RemoteIntegrityError(f"{key} in {self.root} is larger than the {limit} bytes such a file may have")
            return os.read(fd, limit + 1)
        finally:
            os.close(fd)

    def _write_new(self, key: str, write: Callable[[int], None]) -> Path:
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{UPLOAD_SUFFIX}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._io(exc, f"write {key}") from None
        return tmp

    def _publish(self, tmp: Path, key: str, create_only: bool) -> None:
        final = self._path(key)
        try:
            if create_only:
                try:
                    os.link(tmp, final)  # atomic create-only: fails if the name exists
                except FileExistsError:
                    raise RemoteConflict(f"{key} already exists in {self.root}") from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    # a share without hard links (SMB): one daemon writes a prefix, so check, then rename
                    if os.path.lexists(final):
                        raise RemoteConflict(f"{key} already exists in {self.root}") from None
                    os.rename(tmp, final)
                finally:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            raise self._io(exc, f"write {key}") from None

    def put_bytes(self, key: str, data: bytes, sha256: Optional[bytes] = None, metadata: Optional[dict] = None,
                  create_only: bool = False, throttle: Optional[Throttle] = None) -> ObjInfo:
        def write(fd: int) -> None:
            view = memoryview(data)
            while view:
                if throttle is not None:
                    throttle.take(min(len(view), THROTTLE_SLICE))
                view = view[os.write(fd, view[:THROTTLE_SLICE]):]

        tmp = self._write_new(key, write)
        want = b64(sha256 or hashlib.sha256(data).digest())
        got = self._read_back(tmp, len(data))
        if got != want:
            os.unlink(tmp)
            raise RemoteIntegrityError(f"{key} read back from {self.root} differs from what was written")
        self._publish(tmp, key, create_only)
        return ObjInfo(key, len(data), sha256=got)

    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]:
        fd = self._open_read(key)
        try:
            got = 0
            while got < length:
                try:
                    b = os.pread(fd, min(READ_CHUNK, length - got), start + got)
                except OSError as exc:
                    raise self._io(exc, f"read {key}") from None
                if not b:
                    raise RemoteIntegrityError(f"{key} in {self.root} is shorter than recorded")
                got += len(b)
                yield b
        finally:
            os.close(fd)

    def list(self, prefix: str) -> Iterator[ObjInfo]:
        base = self.root / prefix if prefix else self.root
        n = 0
        for root, dirs, files in os.walk(base, followlinks=False):
            rel_root = os.path.relpath(root, self.root)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
            for f in files:
                if f.startswith(".") and f.endswith(UPLOAD_SUFFIX):
                    continue  # an upload in progress (open_uploads lists those)
                p = os.path.join(root, f)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                n += 1
                if n > MAX_LIST:
                    return
                key = f if rel_root == "." else f"{rel_root}/{f}"
                yield ObjInfo(key.replace(os.sep, "/"), st.st_size, mtime=st.st_mtime)

    def delete(self, keys: list[str]) -> None:
        parents = set()
        for k in keys:
            p = self._path(k)
            try:
                os.unlink(p)
                parents.add(p.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._io(exc, f"delete {k}") from None
        for d in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # folders left empty go too
            while d != self.root and d.is_relative_to(self.root):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = d.parent

    # -- "multipart": one temp file written at offsets, read back and renamed into place -------------
    def _upload_path(self, key: str, uid: str) -> Path:
        final = self._path(key)
        return final.with_name(f".{final.name}.{uid}{UPLOAD_SUFFIX}")

    def start_upload(self, key: str, metadata: dict) -> str:
        uid = uuid.uuid4().hex
        p = self._upload_path(key, uid)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as exc:
            raise self._io(exc, f"start writing {key}") from None
        return uid

    def upload_part(self, key: str, uid: str, number: int, offset: int, data: memoryview, sha256: bytes,
                    throttle: Throttle) -> str:
        try:
            fd = os.open(self._upload_path(key, uid), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RemoteNotFound(f"the upload of {key} was aborted") from None
        except OSError as exc:
            raise self._io(exc, f"write {key}") from None
        try:
            pos = 0
            while pos < len(data):
                n = min(THROTTLE_SLICE, len(data) - pos)
                throttle.take(n)
                pos += os.pwrite(fd, data[pos:pos + n], offset + pos)
        except OSError as exc:
            raise self._io(exc, f"write {key}") from None
        finally:
            os.close(fd)
        return b64(sha256)

    def uploaded_parts(self, key: str, uid: str) -> dict[int, tuple[int, str]]:
        return {}  # a folder upload restarts from the beginning (local and network disks are fast to rewrite)

    def complete_upload(self, key: str, uid: str, parts: list[tuple[int, str, str]], size: int,
                        part_size: int) -> ObjInfo:
        p = self._upload_path(key, uid)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._io(exc, f"finish writing {key}") from None
        sha = self._read_back(p, size, part_size)
        self._publish(p, key, create_only=False)
        return ObjInfo(key, size, sha256=sha)

    def _read_back(self, p: Path, size: int, part_size: Optional[int] = None) -> str:
        """The SHA-256 of the file as the folder gives it back (the page cache dropped first, so that a
        network mount is asked for the bytes again): composite as S3 makes it (parts of part_size), or
        of the whole file (part_size None), as S3 reports a multipart and a single upload."""
        digests = []
        whole = part_size is None
        part_size = part_size or max(size, 1)
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if os.fstat(fd).st_size != size:
                raise RemoteIntegrityError(f"{p.name} in {self.root} has {os.fstat(fd).st_size} bytes after writing, "
                                           f"not {size}")
            off = 0
            while off < size or (size == 0 and not digests):
                h = hashlib.sha256()
                end = min(size, off + part_size)
                while off < end:
                    b = os.pread(fd, min(READ_CHUNK, end - off), off)
                    if not b:
                        raise RemoteIntegrityError(f"{p.name} in {self.root} is shorter than written")
                    h.update(b)
                    off += len(b)
                digests.append(h.digest())
                if size == 0:
                    break
        except OSError as exc:
            raise self._io(exc, f"read back {p.name}") from None
        finally:
            os.close(fd)
        return b64(digests[0]) if whole else composite_sha256(digests)

    def abort_upload(self, key: str, uid: str) -> None:
        try:
            os.unlink(self._upload_path(key, uid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._io(exc, f"remove the unfinished upload of {key}") from None

    def open_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        out = []
        base = self.root / prefix if prefix else self.root
        for root, dirs, files in os.walk(base, followlinks=False):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
            for f in files:
                if not (f.startswith(".") and f.endswith(UPLOAD_SUFFIX)):
                    continue
                name, _, uid = f[1:-len(UPLOAD_SUFFIX)].rpartition(".")
                rel_root = os.path.relpath(root, self.root)
                key = name if rel_root == "." else f"{rel_root}/{name}"
                try:
                    mtime = os.lstat(os.path.join(root, f)).st_mtime
                except OSError:
                    continue
                out.append((key.replace(os.sep, "/"), uid, mtime))
        return out


def open_store(target: Target, endpoint_url: Optional[str] = None, region: Optional[str] = None,
               credentials: Optional[Credentials] = None, pool: int = 8, attempts: int = 6) -> Store:
    if target.kind == "s3":
        return S3Store(target, endpoint_url, region, credentials, pool, attempts)
    return FolderStore(target)
