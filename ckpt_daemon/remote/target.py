"""Where a replica goes: the target URL (`s3://bucket/prefix`, or a local or network folder), the
endpoint of an S3-compatible server, and the credentials (from a file or the environment; never from
config.yaml, never logged). No boto3 here: this module is imported by the config model.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

# S3's own bucket naming rules (3-63 characters, lowercase letters, digits, '.' and '-').
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_KEY_PART = re.compile(r"[A-Za-z0-9!_.*'()=+,@~-]+\Z")  # S3's "safe characters", plus a few; no spaces, no '/'
MAX_PREFIX = 512
CREDENTIALS_MAX_BYTES = 64 << 10
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class Target:
    """A parsed replica URL. kind "s3": bucket and prefix ("" or "a/b", no slashes at the ends);
    kind "folder": an absolute folder path (resolved against config.yaml's folder by the caller)."""

    kind: str
    url: str
    bucket: str = ""
    prefix: str = ""
    folder: Optional[Path] = None

    def key(self, *parts: str) -> str:
        """The object key of `parts` under this target's prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return self.url


def parse_url(url: str, base: Optional[Path] = None) -> Target:
    """`s3://bucket[/prefix]`, `file:///abs/folder`, or a folder path (relative to `base`). Raises
    ValueError with a sentence naming what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("give the replica's url: s3://bucket/prefix or a folder path")
    if len(url) > 4096 or "\0" in url or any(c in url for c in "\r\n\t"):
        raise ValueError("a replica url has at most 4096 characters and no control characters")
    if url.startswith("s3://"):
        rest = url[5:]
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise ValueError("carries credentials or a port in its bucket part (not repeated here); credentials never "
                             "go in config.yaml (use credentials_file or the AWS_* environment), and the server's "
                             "address goes in endpoint_url")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(f"{bucket[:70]!r} is not a valid S3 bucket name (3 to 63 lowercase letters, digits, '.' "
                             "and '-', starting and ending with a letter or digit)")
        prefix = prefix.strip("/")
        if len(prefix) > MAX_PREFIX:
            raise ValueError(f"the prefix after the bucket has at most {MAX_PREFIX} characters")
        for part in prefix.split("/") if prefix else []:
            if part in ("", ".", "..") or not _KEY_PART.match(part):
                raise ValueError(f"the prefix {prefix[:80]!r} has an empty, '.', '..' or unusual part {part[:40]!r}; use "
                                 "letters, digits and -_.=+,@~ between the slashes")
        return Target("s3", f"s3://{bucket}" + (f"/{prefix}" if prefix else ""), bucket=bucket, prefix=prefix)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise ValueError(f"{scheme[:20]!r} is not a supported replica scheme: use s3://bucket/prefix (any "
                         "S3-compatible server, with endpoint_url) or a folder path (a local disk or a network mount)")
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    path = Path(os.path.abspath(path))
    if path == Path(path.anchor):
        raise ValueError("a replica folder must not be the filesystem root")
    return Target("folder", str(path), folder=path)


def check_endpoint(url: str) -> str:
    """An endpoint URL: http(s)://host[:port][/path], without credentials, query or fragment."""
    if len(url) > 2048 or any(ord(c) < 0x21 for c in url):
        raise ValueError("an endpoint_url has at most 2048 characters and no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url[:80]!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url[:80]!r} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8333")
    if parts.username or parts.password:
        raise ValueError("carries credentials (not repeated here); credentials never go in config.yaml: put them in "
                         "credentials_file (AWS_ACCESS_KEY_ID=... / AWS_SECRET_ACCESS_KEY=...) or the AWS_* environment")
    if parts.query or parts.fragment:
        raise ValueError(f"{url[:80]!r} has a query or a fragment; give the server's base URL only")
    del port
    return url


@dataclass(frozen=True)
class Credentials:
    """Keys for the S3 client. repr and str never show them."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    source: str = ""

    def __str__(self) -> str:
        return f"credentials from {self.source}"


class CredentialsError(ValueError):
    """The credentials file cannot be used; the message never holds a secret."""


def read_credentials_file(path: Path) -> tuple[Credentials, list[str]]:
    """AWS_ACCESS_KEY_ID=... / AWS_SECRET_ACCESS_KEY=... (optionally AWS_SESSION_TOKEN, `export `, quotes,
    # comments) from `path`. Returns the credentials and warnings (a file others can read). Raises
    CredentialsError with the reason; values are never part of a message."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialsError(f"the credentials file {path} does not exist") from None
    except OSError as exc:
        why = "it is a symlink (never followed)" if exc.errno == 40 else (exc.strerror or str(exc))
        raise CredentialsError(f"the credentials file {path} cannot be opened: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f"the credentials file {path} is not a regular file")
        if st.st_size > CREDENTIALS_MAX_BYTES:
            raise CredentialsError(f"the credentials file {path} is larger than {CREDENTIALS_MAX_BYTES // 1024} KiB; "
                                   "it should hold two lines")
        data = os.read(fd, CREDENTIALS_MAX_BYTES + 1)
    finally:
        os.close(fd)
    warnings = []
    if st.st_mode & 0o077:
        warnings.append(f"the credentials file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                        f"chmod 600 {path}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"the credentials file {path} is not UTF-8 text") from None
    values: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        s = s.removeprefix("export ").strip()
        name, eq, value = s.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise CredentialsError(f"line {n} of the credentials file {path} is not NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if name in CREDENTIAL_KEYS:
            values[name] = value
    missing = [k for k in CREDENTIAL_KEYS[:2] if not values.get(k)]
    if missing:
        raise CredentialsError(f"the credentials file {path} has no {' and no '.join(missing)} line")
    for k, v in values.items():
        if not v.isprintable() or " " in v or len(v) > 4096:
            raise CredentialsError(f"the {k} in the credentials file {path} holds spaces or control characters")
    return Credentials(values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], values.get("AWS_SESSION_TOKEN"),
                       source=str(path)), warnings
