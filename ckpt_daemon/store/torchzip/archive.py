"""The file itself: a torch zip archive read with our own central-directory walk and its bounds, or a
legacy (pre-1.6) torch file checked whole; the small reads of tensor values from storages."""

from __future__ import annotations

import io
import itertools
import os
import re
import stat
import struct
import zipfile
import zlib
from array import array
from typing import Any, Optional, Union

from ckpt_daemon.store.torchzip.bounds import (
    Limits,
    MiB,
    TorchZipError,
    TorchZipLimitError,
    _Budget,
    _crc_fails,
    _describe,
    _not_torch,
    _short,
)
from ckpt_daemon.store.torchzip.unpickle import (
    _DTYPES,
    _KEY_RE,
    StorageRef,
    TensorRef,
    _PickleEnds,
    _SafeUnpickler,
    _scan_pickle_at,
    _walk,
    parse_pickle,
)

# --------------------------------------------------------------------------------------------------
# The zip archive

_EOCD = b"PK\x05\x06"
_EOCD64_LOC = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CDH = b"PK\x01\x02"
_LFH = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch.serialization.MAGIC_NUMBER
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_CHUNK = 1 * MiB
_CDH_STRUCT = struct.Struct("<4sHHHHHHIIIHHHHHII")  # a central directory header, 46 bytes
_TICK = 0xFFF  # check the CPU budget every 4096 items
_EARLY = 1024  # in an archive with more entries, data.pkl is read after this many headers to bound the walk
_FIRST_RECORDS = ("data.pkl", "version", ".data/version", "byteorder")  # kept by the first walk


def _local_data_offset(fp: Any, info: zipfile.ZipInfo) -> int:
    """Where an entry's data starts, from its local header (which must agree with the central one)."""
    return _local_start(fp, info.orig_filename, info.header_offset, info.flag_bits)


def _local_start(fp: Any, name: str, header_offset: int, flags: int) -> int:
    fp.seek(header_offset)
    hdr = fp.read(30)
    if len(hdr) != 30 or hdr[:4] != _LFH:
        raise TorchZipError(f"the local header of {name!r} is missing or damaged")
    nlen, elen = struct.unpack_from("<HH", hdr, 26)
    raw = fp.read(nlen)
    try:
        expected = name.encode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeError:
        expected = None
    if raw != expected:
        raise TorchZipError(f"the local header of {name!r} names another file")
    return header_offset + 30 + nlen + elen


def _bad_name(raw: str) -> Optional[str]:
    if "\x00" in raw:
        return "contains a NUL byte"
    if raw.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", raw):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", raw):
        return "contains '..'"
    if len(raw) > 4096:
        return "is too long"
    return None


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field, for those the header marks 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + length]
        if tag == 0x0001:
            vals, i = [], 0
            for v in (usize, csize, offset):
                if v == 0xFFFFFFFF:
                    if i + 8 > len(body):
                        raise TorchZipError("the zip central directory is damaged (a zip64 field is short)")
                    v = struct.unpack_from("<Q", body, i)[0]
                    i += 8
                vals.append(v)
            return vals[0], vals[1], vals[2]
        pos += 4 + length
    return usize, csize, offset


class _Archive:
    """An opened, structurally checked torch zip archive (read with our own central-directory walk, not
    zipfile: zipfile builds a ~600-byte object per entry before anyone can look at the count).

    The central directory (at most `max_cd_bytes`) is read as a stream and walked twice. The first walk
    checks every header and keeps only the records needed next (data.pkl, version, byteorder); data.pkl
    is then read (its CRC checked) and parsed. torch.save writes one entry per storage data.pkl names
    and a few records, so an archive holding more entries than that is refused before the second walk,
    which builds the table of every entry and checks every local header. A hostile archive of a million
    empty entries thus costs one bounded read and one pass, never a million objects or seeks."""

    legacy = False

    def __init__(self, fp: Any, size: int, limits: Limits) -> None:
        self.fp = fp
        self.size = size
        self.limits = limits
        self.budget = _Budget(limits.max_cpu_s)
        self._parsed: Optional[tuple[Any, list[StorageRef]]] = None
        self._open()

    def close(self) -> None:
        self.fp.close()

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rel(self, name: str) -> str:
        p = self.prefix + "/"
        return name[len(p):] if name.startswith(p) else name

    def name(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    # -- structure ---------------------------------------------------------------------------------

    def _open(self) -> None:
        fp, limits = self.fp, self.limits
        _eocd_pos, cd_start, cd_size, declared = self._find_central_directory(self.size)
        if declared > limits.max_entries:
            raise TorchZipLimitError(f"the archive has {declared} entries, more than the limit of {limits.max_entries}")
        if cd_size > limits.max_cd_bytes:
            raise TorchZipLimitError(f"its zip central directory has {cd_size} bytes, more than the limit of "
                                     f"{limits.max_cd_bytes}")
        self.cd_start, self.cd_size = cd_start, cd_size

        # First walk: every header checked, the records needed to read data.pkl kept. It never walks
        # past the count the end record declares, and in a large archive it reads data.pkl (which
        # torch.save writes first) early: what data.pkl names bounds the walk, so a zip of a million
        # empty entries costs what a real checkpoint's check costs.
        count, first, records, self._records, self._parsed = 0, None, {}, {}, None
        for name, flags, offset, size, crc in self._headers(declared):
            count += 1
            if first is None:
                first = name
                self.prefix = name.split("/", 1)[0]
            if name.startswith(self.prefix + "/") and self.rel(name) in _FIRST_RECORDS:
                records[name] = (flags, offset, size, crc)
            if count == _EARLY < declared:
                if self.name("data.pkl") not in records:
                    raise TorchZipLimitError(f"the archive has {declared} entries and data.pkl is not among "
                                             f"the first {_EARLY} (torch.save writes it first)")
                self._records = records
                self._check_named(declared)
        if count != declared:
            raise TorchZipError(f"the central directory declares {declared} entries but holds {count}")
        if first is None:
            raise _not_torch("(the zip archive is empty)")
        if "/" not in first:
            raise _not_torch("(its entries are not in an archive folder)")
        if self.name("data.pkl") not in records:
            raise _not_torch("(no data.pkl)")
        if self.name("version") not in records and self.name(".data/version") not in records:
            raise TorchZipError("the version record is missing (torch.load refuses such a file)")
        self._records = records
        self._check_named(count)

        # Second walk: the table of every entry; every local header where the central directory says,
        # naming the same file, its data ending before the next entry (or the central directory) begins.
        index: dict[str, int] = {}
        offsets, sizes, crcs, flag_bits = array("Q"), array("Q"), array("L"), array("H")
        for name, flags, offset, size, crc in self._headers():
            if name in index:
                raise TorchZipError(f"entry {_short(name)} appears twice")
            index[name] = len(offsets)
            offsets.append(offset)
            sizes.append(size)
            crcs.append(crc)
            flag_bits.append(flags)
        names = list(index)
        starts = array("Q", bytes(8 * len(names)))
        order = sorted(range(len(names)), key=offsets.__getitem__)
        for n, i in enumerate(order):
            if not n & _TICK:
                self.budget.tick()
            start = _local_start(fp, names[i], offsets[i], flag_bits[i])
            limit = offsets[order[n + 1]] if n + 1 < len(order) else cd_start
            if start + sizes[i] > limit:
                raise TorchZipError(f"{self.rel(names[i])} runs past the start of the next entry "
                                    "(truncated or damaged)")
            starts[i] = start
        self._index, self._names, self._starts, self._sizes, self._crcs = index, names, starts, sizes, crcs
        self.byteorder = "little"
        if self.name("byteorder") in index:
            raw = self.read_record("byteorder", 16)
            if raw not in (b"little", b"big"):
                raise TorchZipError("the byteorder record is neither 'little' nor 'big'")
            self.byteorder = raw.decode()

    def _check_named(self, count: int) -> None:
        """Parse data.pkl (once) and refuse an archive with more entries than the storages it names."""
        limits = self.limits
        if self._parsed is None:
            data = self._read_kept("data.pkl", limits.max_pickle_bytes)
            self._parsed = parse_pickle(data, archive=self.prefix, limits=limits, budget=self.budget)
        named = len({s.key for s in self._parsed[1]})
        if count > named + limits.max_extra_entries:
            raise TorchZipLimitError(f"the archive has {count} entries but data.pkl names {named} storages; "
                                     "torch.save writes one entry per storage and a few records")

    def _headers(self, declared: int | None = None) -> Any:
        """(name, flags, local header offset, size, crc) of each central directory header, checked; read
        as a stream (the file's buffer), so a walk holds one header at a time. It stops past `declared`
        (the end record's count) or the entry limit, whichever is lower."""
        fp, limit, n = self.fp, self.limits.max_entries, 0
        unpack = _CDH_STRUCT.unpack
        fp.seek(self.cd_start)
        left = self.cd_size
        while left > 0:
            hdr = fp.read(46) if left >= 46 else b""
            if len(hdr) != 46:
                raise TorchZipError("the zip central directory is damaged")
            (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, offset) = unpack(hdr)
            if sig != _CDH or 46 + nlen + elen + clen > left:
                raise TorchZipError("the zip central directory is damaged")
            rest = fp.read(nlen + elen + clen)
            if len(rest) != nlen + elen + clen:
                raise TorchZipError("the zip central directory is damaged")
            left -= 46 + len(rest)
            n += 1
            if declared is not None and n > declared:
                raise TorchZipError(f"the central directory declares {declared} entries but holds more")
            if n > limit:
                raise TorchZipLimitError(f"the archive has more than {limit} entries")
            if not n & _TICK:
                self.budget.tick()
            try:
                name = rest[:nlen].decode("utf-8" if flags & 0x800 else "cp437")
            except UnicodeError:
                raise TorchZipError("an entry name is not valid UTF-8") from None
            if 0xFFFFFFFF in (usize, csize, offset):
                usize, csize, offset = _zip64_fields(rest[nlen:nlen + elen], usize, csize, offset)
            why = _bad_name(name)
            if why:
                raise TorchZipError(f"entry name {_short(name)} {why}")
            if flags & 0x1:
                raise TorchZipError(f"entry {_short(name)} is encrypted")
            if method != 0:
                raise TorchZipError(f"entry {_short(name)} is compressed, which torch.save never does")
            if csize != usize:
                raise TorchZipError(f"entry {_short(name)} has inconsistent sizes")
            pos = fp.tell()
            yield name, flags, offset, usize, crc
            fp.seek(pos)  # the consumer may have read elsewhere (data.pkl's local header)

    def _find_central_directory(self, size: int) -> tuple[int, int, int, int]:
        fp = self.fp
        tail_len = min(size, 22 + 65535)
        fp.seek(size - tail_len)
        tail = fp.read(tail_len)
        i = tail.rfind(_EOCD)
        while i >= 0:
            if i + 22 <= len(tail) and i + 22 + struct.unpack_from("<H", tail, i + 20)[0] == len(tail):
                break
            i = tail.rfind(_EOCD, 0, i)
        if i < 0:
            raise TorchZipError("truncated (no zip central directory)")
        eocd_pos = size - tail_len + i
        (_, disk, cd_disk, _, entries, cd_size, cd_offset, _) = struct.unpack_from("<4sHHHHIIH", tail, i)
        end = eocd_pos
        if eocd_pos >= 20:
            fp.seek(eocd_pos - 20)
            loc = fp.read(20)
            if loc[:4] == _EOCD64_LOC:
                _, _, rec_off, _ = struct.unpack("<4sIQI", loc)
                rec_pos = eocd_pos - 20 - 56
                if rec_pos < 0:
                    raise TorchZipError("the zip64 end of central directory is missing (truncated)")
                fp.seek(rec_pos)
                rec = fp.read(56)
                if len(rec) != 56 or rec[:4] != _EOCD64:
                    raise TorchZipError("the zip64 end of central directory is damaged")
                (_, _, _, _, disk, cd_disk, _, entries, cd_size, cd_offset) = struct.unpack("<4sQHHIIQQQQ", rec)
                end = rec_pos
        if disk != 0 or cd_disk != 0:
            raise TorchZipError("multi-disk zip archives are not torch.save files")
        cd_start = end - cd_size
        if cd_start < 0 or cd_offset != cd_start:
            # zipfile would quietly shift every offset by the difference; torch's reader would not.
            raise TorchZipError("the zip central directory is damaged (its offset and size disagree)")
        return eocd_pos, cd_start, cd_size, entries

    # -- records -----------------------------------------------------------------------------------

    def _read_kept(self, rel: str, max_bytes: int) -> bytes:
        """A record kept by the first walk, read before the table exists (its data must end before the
        central directory; the second walk checks the whole layout)."""
        flags, offset, size, crc = self._records[self.name(rel)]
        if size > max_bytes:
            raise TorchZipLimitError(f"{rel} is larger than {max_bytes} bytes")
        start = _local_start(self.fp, self.name(rel), offset, flags)
        if start + size > self.cd_start:
            raise TorchZipError(f"{rel} runs past the start of the next entry (truncated or damaged)")
        return self._read_checked(rel, start, size, crc)

    def _read_checked(self, rel: str, start: int, size: int, crc: int) -> bytes:
        self.fp.seek(start)
        data = self.fp.read(size)
        if len(data) != size:
            raise TorchZipError(f"{rel} is truncated")
        if zlib.crc32(data) != crc:
            raise _crc_fails(rel)
        return data

    def read_record(self, rel: str, max_bytes: int) -> bytes:
        """Read a whole small record and check its CRC."""
        i = self._index[self.name(rel)]
        if self._sizes[i] > max_bytes:
            raise TorchZipError(f"{rel} is larger than {max_bytes} bytes")
        return self._read_checked(rel, self._starts[i], self._sizes[i], self._crcs[i])

    def load(self) -> tuple[Any, list[StorageRef], list[TensorRef]]:
        root, storages = self._parsed
        tensors = _walk(root, self.limits, self.budget)
        need: dict[str, int] = {}
        for ref in storages:
            nbytes = ref.nbytes
            need[ref.key] = max(need.get(ref.key, 0), nbytes or 0)
        for key, nbytes in need.items():
            i = self._index.get(self.name(f"data/{key}"))
            if i is None:
                raise TorchZipError(f"storage data/{key} is missing")
            if self._sizes[i] < nbytes:
                raise TorchZipError(f"storage data/{key} is truncated: it needs {nbytes} bytes and holds "
                                    f"{self._sizes[i]}")
        self.storage_keys = sorted(need)
        return root, storages, tensors

    def storage_bytes(self) -> int:
        return sum(self._sizes[self._index[self.name(f"data/{k}")]] for k in self.storage_keys)

    def verify_crc(self) -> None:
        fp = self.fp
        for i in sorted(range(len(self._names)), key=self._starts.__getitem__):
            rel, left, crc = self.rel(self._names[i]), self._sizes[i], 0
            fp.seek(self._starts[i])
            while left:
                chunk = fp.read(min(left, _CHUNK))
                if not chunk:
                    raise TorchZipError(f"{rel} cannot be read (the file was cut short while it was read)")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if crc != self._crcs[i]:
                raise _crc_fails(rel)

    def read_tensor(self, ref: TensorRef) -> Any:
        i = self._index.get(self.name(f"data/{ref.storage.key}"))
        if i is None:
            raise TorchZipError(f"storage data/{ref.storage.key} is missing")
        return _read_values(self.fp, self._starts[i], self._sizes[i], ref, self.byteorder)


class _LegacyUnpickler(_SafeUnpickler):
    """The object pickle of a legacy torch file: storages are ("storage", type, key, location, numel,
    view) persistent ids, classes of pickled modules ("module", class, file, source)."""

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 4 and pid[0] == "module":
            return pid[1]
        if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage":
            raise TorchZipError("data.pkl has a persistent id that is not a storage")
        ref = super().persistent_load(pid[:5])
        view = pid[5]
        if view is not None:
            if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str and _KEY_RE.fullmatch(view[0])
                    and all(type(v) is int and 0 <= v < 1 << 62 for v in view[1:])
                    and view[1] + view[2] <= ref.numel):
                raise TorchZipError(f"storage {ref.key} has a malformed view")
        return ref


class _LegacyArchive:
    """A torch.save file in the legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`):
    five pickles (torch's magic number, the protocol version 1001, sys_info, the object, the sorted keys
    of its storages), then every storage as an 8-byte element count and its raw bytes, to the very end
    of the file. There are no checksums in it; its whole structure is checked instead (every pickle, each
    storage's count against what the object says, the exact file size), so a file cut anywhere or padded
    is caught. Damage inside tensor bytes is caught by the checksums the daemon records (foreign.py)."""

    legacy = True
    prefix = ""

    def __init__(self, fp: Any, size: int, limits: Limits) -> None:
        self.fp = fp
        self.size = size
        self.limits = limits
        self.budget = _Budget(limits.max_cpu_s)
        try:
            self._open()
        except TorchZipError as e:
            # the shared stubs name data.pkl, the zip format's pickle; here it is the file's own pickle
            raise type(e)(str(e).replace("data.pkl", "its pickle"), e.kind) from None

    def close(self) -> None:
        self.fp.close()

    def __enter__(self) -> "_LegacyArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rel(self, name: str) -> str:
        return name

    def _pickle(self, data: bytes, pos: int, what: str, unpickler: type = _SafeUnpickler) -> tuple[Any, int, Any]:
        try:
            _, end = _scan_pickle_at(data, self.limits, pos, what, self.budget)
        except _PickleEnds:
            if len(data) < self.size:
                raise TorchZipLimitError(f"{what} is larger than {self.limits.max_pickle_bytes} bytes") from None
            raise TorchZipError(f"truncated ({what} ends before it is complete)") from None
        up = unpickler(io.BytesIO(data[pos:end]), limits=self.limits)
        try:
            obj = up.load()
        except TorchZipError:
            raise
        except RecursionError:
            raise TorchZipError(f"{what} is malformed (too deeply nested)") from None
        except MemoryError:
            raise TorchZipError(f"{what} needs more memory than is available to read") from None
        except Exception as e:
            raise TorchZipError(f"{what} cannot be read ({_describe(e)})") from None
        return obj, end, up

    def _open(self) -> None:
        fp, size = self.fp, self.size
        fp.seek(0)
        data = fp.read(min(size, self.limits.max_pickle_bytes + 64 * 1024))
        magic, pos, _ = self._pickle(data, 0, "its magic number")
        if type(magic) is not int or magic != _MAGIC_NUMBER:
            raise _not_torch("(a pickle without torch's magic number)")
        proto, pos, _ = self._pickle(data, pos, "its protocol version")
        if type(proto) is not int or proto != _LEGACY_PROTOCOL:
            raise _not_torch(f"(legacy protocol version {_short(proto)}, not 1001)")
        sys_info, pos, _ = self._pickle(data, pos, "its sys_info record")
        if not isinstance(sys_info, dict) or type(sys_info.get("little_endian")) is not bool:
            raise TorchZipError("its sys_info record is malformed")
        self.byteorder = "little" if sys_info["little_endian"] else "big"
        root, pos, up = self._pickle(data, pos, "its pickle", _LegacyUnpickler)
        keys, pos, _ = self._pickle(data, pos, "its list of storages")
        named: dict[str, StorageRef] = {}
        for ref in up.storages:
            seen = named.setdefault(ref.key, ref)
            if seen.numel != ref.numel or seen.dtype != ref.dtype:
                raise TorchZipError(f"its pickle names storage {ref.key} with two sizes or types")
        if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
            raise TorchZipError("its list of storages is malformed")
        if set(keys) != set(named):
            missing = sorted(set(named) - set(keys)) or sorted(set(keys) - set(named))
            raise TorchZipError(f"its list of storages does not match its pickle (storage {_short(missing[0])})")
        self._parsed = (root, up.storages)
        # The storages: an element count (which must be what the pickle says) and the bytes, back to back.
        bo = ">" if self.byteorder == "big" else "<"
        self._starts: dict[str, tuple[int, int]] = {}
        for n, key in enumerate(keys):
            if not n & _TICK:
                self.budget.tick()
            ref = named[key]
            itemsize = ref.itemsize
            if itemsize is None:
                raise TorchZipError(f"storage {key} has a dtype of unknown size")
            if pos + 8 > size:
                raise TorchZipError(f"truncated (the file ends before storage {key})")
            fp.seek(pos)
            (count,) = struct.unpack(bo + "q", fp.read(8))
            if count != ref.numel:
                raise TorchZipError(f"storage {key} holds {count} elements, its pickle says {ref.numel} "
                                    "(damaged or not this file's data)")
            nbytes = count * itemsize
            self._starts[key] = (pos + 8, nbytes)
            pos += 8 + nbytes
            if pos > size:
                raise TorchZipError(f"storage {key} is truncated: it needs {nbytes} bytes and holds "
                                    f"{size - (pos - nbytes)}")
        if pos != size:
            raise TorchZipError(f"{size - pos} bytes follow its last storage (torch.save writes none: damaged or "
                                "padded)")
        self.storage_keys = sorted(keys)

    def load(self) -> tuple[Any, list[StorageRef], list[TensorRef]]:
        root, storages = self._parsed
        try:
            tensors = _walk(root, self.limits, self.budget)
        except TorchZipError as e:
            raise type(e)(str(e).replace("data.pkl", "its pickle"), e.kind) from None
        return root, storages, tensors

    def storage_bytes(self) -> int:
        return sum(self._starts[k][1] for k in self.storage_keys)

    def verify_crc(self) -> None:
        """Nothing to do: the format has no checksums (its structure was checked whole when opened)."""

    def read_tensor(self, ref: TensorRef) -> Any:
        where = self._starts.get(ref.storage.key)
        if where is None:
            raise TorchZipError(f"storage {ref.storage.key} is missing")
        return _read_values(self.fp, where[0], where[1], ref, self.byteorder)


def _read_values(fp: Any, data_start: int, file_size: int, ref: TensorRef, byteorder: str) -> Any:
    numel = ref.numel
    if numel > 16:
        raise TorchZipError(f"the tensor has {numel} elements; only tensors of up to 16 are read")
    itemsize, fmt = _DTYPES.get(ref.dtype, (None, None))
    if fmt is None or itemsize is None:
        raise TorchZipError(f"tensors of dtype {_short(ref.dtype)} cannot be read")
    if numel == 0:
        return []
    bo = ">" if byteorder == "big" else "<"
    values = []
    for index in itertools.product(*(range(s) for s in ref.shape)):
        elem = ref.offset + sum(i * st for i, st in zip(index, ref.stride))
        pos = elem * itemsize
        if pos + itemsize > file_size:
            raise TorchZipError(f"a tensor extends past the end of storage data/{ref.storage.key}")
        fp.seek(data_start + pos)
        raw = fp.read(itemsize)
        if len(raw) != itemsize:
            raise TorchZipError(f"storage data/{ref.storage.key} is truncated")
        values.append(_decode(raw, fmt, bo))
    if numel == 1:
        return values[0]
    return values


def _decode(raw: bytes, fmt: str, bo: str) -> Any:
    if fmt == "bf16":
        (bits,) = struct.unpack(bo + "H", raw)
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    if fmt in ("c4", "c8", "c16"):
        part = {"c4": "e", "c8": "f", "c16": "d"}[fmt]
        re_, im = struct.unpack(bo + part * 2, raw)
        return complex(re_, im)
    return struct.unpack(bo + fmt, raw)[0]


# --------------------------------------------------------------------------------------------------
# Opening a file: a zip archive or a legacy file


def _open_archive(path: Union[str, os.PathLike], limits: Limits) -> Union[_Archive, _LegacyArchive]:
    """The file opened and its structure checked: a zip archive (torch >= 1.6) or a legacy file."""
    try:
        # O_NONBLOCK: a FIFO planted under a checkpoint's name must not hang us in open(); only regular
        # files are read.
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise TorchZipError(f"cannot read the file ({_describe(e)})") from None
    fp = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TorchZipError("not a regular file")
        fp = os.fdopen(fd, "rb")
        if st.st_size == 0:
            raise TorchZipError("empty file")
        head = fp.read(512)
        if head.startswith(_LFH):
            return _Archive(fp, st.st_size, limits)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            return _LegacyArchive(fp, st.st_size, limits)
        if len(head) >= 262 and head[257:262] == b"ustar":
            raise _not_torch("ckpt-daemon can check (torch's pre-1.0 tar format)")
        raise _not_torch("(neither a zip archive nor a legacy torch file)")
    except BaseException as exc:
        if fp is not None:
            fp.close()
        else:
            os.close(fd)
        if isinstance(exc, TorchZipError):
            raise
        if isinstance(exc, RecursionError):
            raise TorchZipError("the archive is malformed (too deeply nested)") from None
        if isinstance(exc, MemoryError):
            raise TorchZipError("the file needs more memory than is available to check") from None
        if isinstance(exc, OSError):
            raise TorchZipError(f"cannot read the file ({_describe(exc)})") from None
        if isinstance(exc, Exception):
            raise TorchZipError(f"the archive is malformed ({_describe(exc)})") from None
        raise
