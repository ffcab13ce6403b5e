"""Read `torch.save` files without torch, without numpy and without unpickling anything.

Users bring their own trainers, whose checkpoints are `torch.save` files (Lightning `.ckpt`, nanoGPT-style
`.pt` dicts, Hugging Face `optimizer.pt`, `rng_state.pth`, `pytorch_model.bin`, ...). The daemon must know
whether such a file is complete, whether its CRCs hold and what it says about itself (step, epoch,
metrics, optimizer state, Lightning's ModelCheckpoint state), and it must learn that without importing
torch and without running anything the file names: every byte is untrusted input.

A `torch.save` file (PyTorch >= 1.6) is a zip archive whose entries all sit in one folder:

    <archive>/data.pkl        the pickled object; tensors are persistent ids naming storages
    <archive>/data/<key>      raw storage bytes, one entry per storage
    <archive>/byteorder       "little" or "big" (absent in old files: little)
    <archive>/version         the format version; torch.load refuses an archive without it
    <archive>/.format_version, .storage_alignment, .data/serialization_id   (newer torch)

`data.pkl` is read by `SafeUnpickler`: `find_class` never imports. Names torch, numpy, collections and
Lightning use map to local stubs that only record what was asked (a tensor becomes a `TensorRef`, its
storage a `StorageRef`); every other name becomes an `Unknown` placeholder class, which can be called,
instantiated and filled but runs nothing. Before the unpickler runs, a scan of the opcodes bounds what
the C unpickler would otherwise do unbounded: the number of opcodes, the memo indices (a 5-byte
LONG_BINPUT can make it allocate 32 GiB) and the nesting of tuples (hashing a tuple nested a million
deep crashes CPython with a C stack overflow). The resulting structure is walked iteratively with a
depth and a node cap.

The archive itself is bounded by the work a real checkpoint needs: its entry count, the size of its
central directory (read whole, walked without zipfile's per-entry objects), entries beyond the storages
data.pkl names, and the CPU time the structure check may take (`Limits`); past a bound, the file is
refused with `TorchZipLimitError` before the work, whatever its name says.

Legacy files (torch < 1.6, or `_use_new_zipfile_serialization=False`: pickles followed by raw storages)
are read the same way and checked whole, storage by storage to the last byte; they hold no checksums.

Public API: `check`, `inspect`, `read_scalar`, `parse_pickle`, `TorchZipError`, `TorchZipLimitError`,
`TorchZipTimeout`, `TorchFileInfo`, `LightningInfo`, `ModelCheckpointState`, `TensorRef`, `StorageRef`,
`Unknown`, `Limits`.
Stdlib only; never imports torch or numpy.
"""

from __future__ import annotations

import _compat_pickle
import io
import itertools
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import time
import zipfile
import zlib
from array import array
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Optional, Union

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "LightningInfo",
    "ModelCheckpointState",
    "SafeUnpickler",
    "StorageRef",
    "TensorRef",
    "TorchFileInfo",
    "TorchZipError",
    "TorchZipLimitError",
    "TorchZipTimeout",
    "Unknown",
    "check",
    "inspect",
    "parse_pickle",
    "read_scalar",
]

MiB = 1024 * 1024


class TorchZipError(ValueError):
    """The file is not a complete, readable torch.save archive, or a bound was exceeded.

    `str(err)` is a short reason in plain words ("truncated (no zip central directory)",
    "storage data/3 is missing", "CRC of data/5 fails", ...).
    """


class TorchZipLimitError(TorchZipError):
    """A bound of `Limits` was exceeded: the file asks for more work than any real checkpoint needs
    (a million entries, a central directory of gigabytes...). Not a checkpoint, whatever its name."""


class TorchZipTimeout(TorchZipLimitError):
    """The structure check used up its CPU time (`Limits.max_cpu_s`): whatever the file is, it was not
    told apart from a checkpoint in time. Callers report it as unreadable, never as damage."""


class _Budget:
    """The CPU time one check may spend on structure (this thread's time: a busy machine does not count).
    `tick()` is called every few thousand items of any loop over untrusted counts."""

    __slots__ = ("limit", "end")

    def __init__(self, limit_s: float) -> None:
        self.limit = limit_s
        self.end = time.thread_time() + limit_s

    def tick(self) -> None:
        if time.thread_time() > self.end:
            raise TorchZipTimeout(f"checking its structure took more than {self.limit:g} CPU seconds; "
                                  "no real checkpoint needs that")


@dataclass(frozen=True)
class Limits:
    """Every bound applied to untrusted input. The defaults fit real checkpoints with a wide margin."""

    max_pickle_bytes: int = 64 * MiB      # size of data.pkl
    max_pickle_ops: int = 4_000_000       # opcodes in data.pkl (torch memoizes nearly every object: ~2 per value)
    max_depth: int = 128                  # nesting of the unpickled structure (and of tuples, in the scan)
    max_nodes: int = 2_000_000            # objects visited when walking the unpickled structure
    max_globals: int = 10_000             # distinct module.name globals data.pkl may name
    max_entries: int = 250_000            # zip entries; a real file has one per storage (the largest MoE
                                          # training state in one file: ~200k), plus a few records
    max_cd_bytes: int = 64 * MiB          # the zip central directory, read whole (~100 bytes per entry)
    max_extra_entries: int = 64           # entries beyond the storages data.pkl names (torch.save writes ~6)
    max_cpu_s: float = 30.0               # CPU seconds (this thread's) to check the structure; CRCs excluded
                                          # (the largest real file here: ~10 s for 250k storages)
    max_scalar_reads: int = 4096          # small tensors read from storages by one `inspect`
    max_string: int = 4096                # longest path / string reported in TorchFileInfo


DEFAULT_LIMITS = Limits()

# --------------------------------------------------------------------------------------------------
# dtypes

# name -> (itemsize, struct format of one element or a special decoder name, or None if not decodable)
_DTYPES: dict[str, tuple[Optional[int], Optional[str]]] = {
    "float64": (8, "d"), "float32": (4, "f"), "float16": (2, "e"), "bfloat16": (2, "bf16"),
    "int64": (8, "q"), "int32": (4, "i"), "int16": (2, "h"), "int8": (1, "b"),
    "uint64": (8, "Q"), "uint32": (4, "I"), "uint16": (2, "H"), "uint8": (1, "B"), "bool": (1, "?"),
    "complex128": (16, "c16"), "complex64": (8, "c8"), "complex32": (4, "c4"),
    "qint8": (1, None), "quint8": (1, None), "qint32": (4, None), "quint4x2": (1, None),
    "quint2x4": (1, None),
    "float8_e4m3fn": (1, None), "float8_e4m3fnuz": (1, None), "float8_e5m2": (1, None),
    "float8_e5m2fnuz": (1, None), "float8_e8m0fnu": (1, None), "float4_e2m1fn_x2": (1, None),
    "bits8": (1, None), "bits16": (2, None), "bits1x8": (1, None), "bits2x4": (1, None),
    "bits4x2": (1, None),
}
# Sub-byte shell dtypes: known names, but no reliable element size for bounds checks.
for _i in range(1, 8):
    _DTYPES[f"int{_i}"] = (None, None)
    _DTYPES[f"uint{_i}"] = (None, None)

# Legacy typed storage class name -> dtype of its elements.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}

_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
_INT_DTYPES = {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"}

# --------------------------------------------------------------------------------------------------
# What data.pkl unpickles into


class _Sealed:
    """Objects pickle's BUILD must not change: BUILD calls `__setstate__`, which refuses. (Without it,
    BUILD's slot-state path would `setattr` any attribute, e.g. rewrite a validated TensorRef's shape or
    a module-level stub shared by every later read.)"""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TorchZipError("data.pkl tries to change an object it may not change")


class StorageRef(_Sealed):
    """A storage named by data.pkl: `<archive>/data/<key>`, `numel` elements of `dtype`."""

    __slots__ = ("key", "dtype", "numel", "location", "archive")

    def __init__(self, key: str, dtype: str, numel: int, location: str, archive: str = "") -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location
        self.archive = archive

    @property
    def dtype_name(self) -> str:
        return self.dtype

    @property
    def itemsize(self) -> Optional[int]:
        return _DTYPES.get(self.dtype, (None, None))[0]

    @property
    def nbytes(self) -> Optional[int]:
        size = self.itemsize
        return None if size is None else self.numel * size

    @property
    def entry(self) -> str:
        return f"{self.archive}/data/{self.key}" if self.archive else f"data/{self.key}"

    def __repr__(self) -> str:
        return (f"StorageRef(key={_short(self.key)}, dtype={self.dtype}, numel={self.numel}, "
                f"location={_short(self.location)})")


class TensorRef(_Sealed):
    """A tensor in data.pkl: a view (`offset`, `shape`, `stride`, in elements) into `storage`."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad", "is_parameter")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple, stride: tuple, dtype: str,
                 requires_grad: bool = False) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.is_parameter = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"TensorRef(shape={self.shape}, dtype={self.dtype}, storage={self.storage.key!r})"


class Unknown:
    """Stands for a global named in data.pkl that we do not load: a class or function of the user's code,
    of torch.nn, of Lightning... `find_class` returns a subclass per (module, name); calling it, or
    NEWOBJ on it, makes an instance that records its arguments, state and items. Nothing runs.
    """

    __slots__ = ("args", "kwargs", "state", "items", "listitems")
    _tz_module = "?"
    _tz_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Unknown":
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = None
        self.listitems = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Unknown":
        return _UnknownCall(self, *args, **kwargs)

    # What pickle's BUILD, SETITEM(S), APPEND(S) and ADDITEMS call: record, never run.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = []
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        if self.listitems is None:
            self.listitems = []
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        if type(values) is not list:
            raise TorchZipError("data.pkl extends a placeholder with a non-list")
        if self.listitems is None:
            self.listitems = []
        self.listitems.extend(values)

    def add(self, value: Any) -> None:
        self.append(value)

    @property
    def module(self) -> str:
        return type(self)._tz_module

    @property
    def name(self) -> str:
        return type(self)._tz_name

    def __repr__(self) -> str:
        return f"Unknown({_short(self.module)}, {_short(self.name)})"


class _UnknownCall(Unknown):
    __slots__ = ()
    _tz_module = "<call>"
    _tz_name = "<call>"


class _Namespace(Unknown):
    __slots__ = ()
    _tz_module = "argparse"
    _tz_name = "Namespace"


class _Marker(_Sealed):
    """A value torch pickles as a global and that we only need by name (a dtype, a storage class...)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: str) -> None:
        self.kind = kind
        self.value = value

    def __repr__(self) -> str:
        return f"<{self.kind} {self.value}>"


class _ODict(dict):
    """collections.OrderedDict / Counter / defaultdict: a dict (insertion-ordered) plus pickled state
    (torch state dicts carry `_metadata`)."""

    __slots__ = ("state",)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _NpDType:
    __slots__ = ("name", "byteorder")

    def __init__(self, name: str) -> None:
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if type(state) is tuple and len(state) > 1 and type(state[1]) is str:
            self.byteorder = state[1]


class _NpArray:
    __slots__ = ("shape", "dtype", "nbytes")

    def __init__(self) -> None:
        self.shape = None
        self.dtype = None
        self.nbytes = None

    def __setstate__(self, state: Any) -> None:
        if type(state) is tuple and len(state) == 5:
            _, shape, dtype, _, raw = state
            if type(shape) is tuple and all(type(s) is int for s in shape):
                self.shape = shape
            if isinstance(dtype, _NpDType):
                self.dtype = dtype
            if type(raw) in (bytes, bytearray):
                self.nbytes = len(raw)


_NP_FORMATS = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
               "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}


class _NpScalar(_Sealed):
    """numpy.core.multiarray.scalar(dtype, raw bytes): a numpy number; `value` decodes common dtypes."""

    __slots__ = ("dtype", "raw")

    def __init__(self, dtype: Any, raw: Any) -> None:
        self.dtype = dtype
        self.raw = raw

    @property
    def value(self) -> Union[int, float, bool, None]:
        if not isinstance(self.dtype, _NpDType) or type(self.raw) is not bytes:
            return None
        fmt = _NP_FORMATS.get(self.dtype.name)
        if fmt is None or len(self.raw) != struct.calcsize(fmt):
            return None
        order = ">" if self.dtype.byteorder == ">" else "<"
        return struct.unpack(order + fmt, self.raw)[0]


# --------------------------------------------------------------------------------------------------
# Stubs for the globals torch.save files use. Each checks its arguments and returns our own objects.


def _check_shape(size: Any, stride: Any) -> tuple[tuple, tuple]:
    if isinstance(size, list):
        size = tuple(size)
    if isinstance(stride, list):
        stride = tuple(stride)
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or len(size) > 64:
        raise TorchZipError("data.pkl has a tensor with a malformed shape or stride")
    for v in size + stride:
        if type(v) is not int or v < 0 or v >= 1 << 62:
            raise TorchZipError("data.pkl has a tensor with a malformed shape or stride")
    return size, stride


def _extent(offset: int, size: tuple, stride: tuple) -> int:
    """Elements of storage a view needs (offset included)."""
    if any(s == 0 for s in size):
        return 0
    return offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1


def _make_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[str],
                 requires_grad: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise TorchZipError("data.pkl has a tensor whose storage is not a storage")
    if type(offset) is not int or offset < 0 or offset >= 1 << 62:
        raise TorchZipError("data.pkl has a tensor with a malformed storage offset")
    size, stride = _check_shape(size, stride)
    if dtype is None:  # typed storage: the tensor has the storage's dtype, numel counts its elements
        dtype = storage.dtype
        if _extent(offset, size, stride) > storage.numel:
            raise TorchZipError(f"a tensor extends past the end of storage data/{storage.key}")
    else:  # untyped storage: numel counts bytes
        itemsize = _DTYPES.get(dtype, (None, None))[0]
        if itemsize is not None and _extent(offset, size, stride) * itemsize > storage.numel:
            raise TorchZipError(f"a tensor extends past the end of storage data/{storage.key}")
    return TensorRef(storage, offset, size, stride, dtype, requires_grad is True)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorRef:
    return _make_tensor(storage, storage_offset, size, stride, None, False)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> TensorRef:
    return _make_tensor(storage, storage_offset, size, stride, None, requires_grad)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorRef:
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise TorchZipError("data.pkl has a tensor with a malformed dtype")
    return _make_tensor(storage, storage_offset, size, stride, dtype.value, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    if isinstance(data, TensorRef):
        data.is_parameter = True
        data.requires_grad = requires_grad is True
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if isinstance(func, _Stub) and func.fn in _REBUILDERS and type(args) is tuple:
        return func(*args)
    return _UnknownCall(func, new_type, args, state)


_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}


def _torch_size(*args: Any) -> tuple:
    if len(args) == 1 and type(args[0]) in (tuple, list) and len(args[0]) <= 64 \
            and all(type(v) is int for v in args[0]):
        return tuple(args[0])
    raise TorchZipError("data.pkl has a malformed torch.Size")


def _torch_device(*args: Any) -> str:
    if 1 <= len(args) <= 2 and type(args[0]) is str and len(args[0]) <= 64:
        if len(args) == 1 or args[1] is None:
            return args[0]
        if type(args[1]) is int:
            return f"{args[0]}:{args[1]}"
    raise TorchZipError("data.pkl has a malformed torch.device")


def _get_layout(name: Any) -> _Marker:
    if type(name) is not str or len(name) > 64:
        raise TorchZipError("data.pkl has a malformed tensor layout")
    return _Marker("layout", name)


def _odict(*args: Any) -> _ODict:
    if not args:
        return _ODict()
    if len(args) == 1:
        (src,) = args
        if type(src) is dict or isinstance(src, _ODict):
            return _ODict(src)
        if type(src) in (list, tuple):
            out = _ODict()
            for pair in src:
                if type(pair) not in (tuple, list) or len(pair) != 2:
                    raise TorchZipError("data.pkl builds a dict from something that is not pairs")
                out[pair[0]] = pair[1]
            return out
    raise TorchZipError("data.pkl builds a dict from malformed arguments")


def _defaultdict(*args: Any) -> _ODict:
    return _ODict()  # the default factory is a placeholder; the items come by SETITEMS


def _set(*args: Any) -> set:
    if not args:
        return set()
    if len(args) == 1 and type(args[0]) in (list, tuple, set, frozenset):
        return set(args[0])
    raise TorchZipError("data.pkl builds a set from malformed arguments")


def _frozenset(*args: Any) -> frozenset:
    return frozenset(_set(*args))


def _slice(*args: Any) -> slice:
    if 1 <= len(args) <= 3:
        return slice(*args)
    raise TorchZipError("data.pkl builds a slice from malformed arguments")


def _complex(*args: Any) -> complex:
    if 1 <= len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    raise TorchZipError("data.pkl builds a complex from malformed arguments")


def _codecs_encode(*args: Any) -> bytes:
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise TorchZipError("data.pkl calls _codecs.encode with unexpected arguments")


def _bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and type(args[0]) is bytes:
        return args[0]
    return _codecs_encode(*args)


def _bytearray(*args: Any) -> bytearray:
    return bytearray(_bytes(*args))


def _path_factory(pure: type) -> Any:
    def build(*parts: Any) -> str:
        if len(parts) > 4096 or not all(type(p) is str for p in parts) or sum(map(len, parts)) > 65536:
            raise TorchZipError("data.pkl builds a path from malformed arguments")
        return str(pure(*parts))
    return build


def _np_reconstruct(*args: Any) -> _NpArray:
    return _NpArray()


def _np_dtype(*args: Any) -> _NpDType:
    if args and type(args[0]) is str and len(args[0]) <= 64:
        return _NpDType(args[0])
    raise TorchZipError("data.pkl builds a numpy dtype from malformed arguments")


def _np_scalar(*args: Any) -> _NpScalar:
    if len(args) == 2:
        return _NpScalar(args[0], args[1])
    return _NpScalar(None, None)


class _Stub(_Sealed):
    """A module-level stub function, handed to the unpickler wrapped so that BUILD cannot set its
    `__defaults__` or `__dict__` (it would otherwise persist for every later file read)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "fn", fn)

    def __setattr__(self, key: str, value: Any) -> None:
        raise TorchZipError("data.pkl tries to change a stub")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stub {self.fn.__name__}>"


def _named(module: str, name: str, base: type = Unknown) -> type:
    return type("Unknown", (base,), {"__slots__": (), "_tz_module": module, "_tz_name": name,
                                     "__module__": __name__})


_NP_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_STUBS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _odict,
    ("collections", "Counter"): _odict,
    ("collections", "defaultdict"): _defaultdict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "slice"): _slice,
    ("builtins", "complex"): _complex,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("argparse", "Namespace"): _Namespace,
    ("pathlib", "PosixPath"): _path_factory(PurePosixPath),
    ("pathlib", "PurePosixPath"): _path_factory(PurePosixPath),
    ("pathlib", "Path"): _path_factory(PurePosixPath),
    ("pathlib", "WindowsPath"): _path_factory(PureWindowsPath),
    ("pathlib", "PureWindowsPath"): _path_factory(PureWindowsPath),
    ("numpy", "ndarray"): _named("numpy", "ndarray"),
    ("numpy", "dtype"): _np_dtype,
}
for _m in _NP_MODULES:
    _STUBS[(_m, "_reconstruct")] = _np_reconstruct
    _STUBS[(_m, "scalar")] = _np_scalar
for _name in _DTYPES:
    _STUBS[("torch", _name)] = _Marker("dtype", _name)
for _name, _dt in _STORAGE_DTYPES.items():
    for _m in ("torch", "torch.storage", "torch.cuda"):
        _STUBS[(_m, _name)] = _Marker("storage", _dt)
_STUBS = {k: _Stub(v) if callable(v) and not isinstance(v, type) and not isinstance(v, _Sealed) else v
          for k, v in _STUBS.items()}

# --------------------------------------------------------------------------------------------------
# The opcode scan that bounds what the C unpickler does


_A_PUSH, _A_PUSH_TUPLE0, _A_MARK, _A_MARK_PUSH, _A_TUPLE, _A_TUPLE_N, _A_MARK_POP, _A_POP1, _A_POP, \
    _A_POP2, _A_POP2_PUSH, _A_POP3_PUSH, _A_POP1_PUSH, _A_DUP, _A_PUT, _A_MEMOIZE, _A_GET, _A_NOP, \
    _A_STOP = range(19)

_ACTIONS: dict[str, int] = {}
for _n in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
           "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE",
           "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT",
           "BINFLOAT", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "GLOBAL", "EXT1", "EXT2", "EXT4",
           "PERSID", "NEXT_BUFFER"):
    _ACTIONS[_n] = _A_PUSH
_ACTIONS.update({
    "EMPTY_TUPLE": _A_PUSH_TUPLE0, "MARK": _A_MARK,
    "LIST": _A_MARK_PUSH, "DICT": _A_MARK_PUSH, "FROZENSET": _A_MARK_PUSH, "INST": _A_MARK_PUSH,
    "OBJ": _A_MARK_PUSH, "TUPLE": _A_TUPLE, "TUPLE1": _A_TUPLE_N, "TUPLE2": _A_TUPLE_N,
    "TUPLE3": _A_TUPLE_N, "APPENDS": _A_MARK_POP, "SETITEMS": _A_MARK_POP, "ADDITEMS": _A_MARK_POP,
    "POP_MARK": _A_MARK_POP, "APPEND": _A_POP1, "BUILD": _A_POP1, "POP": _A_POP, "SETITEM": _A_POP2,
    "REDUCE": _A_POP2_PUSH, "NEWOBJ": _A_POP2_PUSH, "STACK_GLOBAL": _A_POP2_PUSH,
    "NEWOBJ_EX": _A_POP3_PUSH, "BINPERSID": _A_POP1_PUSH, "DUP": _A_DUP,
    "PUT": _A_PUT, "BINPUT": _A_PUT, "LONG_BINPUT": _A_PUT, "MEMOIZE": _A_MEMOIZE,
    "GET": _A_GET, "BINGET": _A_GET, "LONG_BINGET": _A_GET,
    "PROTO": _A_NOP, "FRAME": _A_NOP, "READONLY_BUFFER": _A_NOP, "STOP": _A_STOP,
})
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Malformed(Exception):
    pass


class _Ends(_Malformed):
    """The pickle runs past the end of the bytes it was given."""


class _PickleEnds(TorchZipError):
    pass


_ARG_NONE, _ARG_FIXED, _ARG_LINE, _ARG_LINE2, _ARG_LEN = range(5)
_LEN_FORMATS = {pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1), pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
                pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4), pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8)}
# opcode byte -> (name, action, argument kind, argument size or length-prefix size, length-prefix format)
_OPCODES: dict[int, tuple[str, int, int, int, str]] = {}
for _op in pickletools.opcodes:
    _arg = _op.arg
    if _arg is None:
        _spec = (_ARG_NONE, 0, "")
    elif _arg.n >= 0:
        _spec = (_ARG_FIXED, _arg.n, "")
    elif _arg.n == pickletools.UP_TO_NEWLINE:
        _spec = (_ARG_LINE2 if _arg.name == "stringnl_noescape_pair" else _ARG_LINE, 0, "")
    else:
        _fmt, _size = _LEN_FORMATS[_arg.n]
        _spec = (_ARG_LEN, _size, _fmt)
    _OPCODES[ord(_op.code)] = (_op.name, _ACTIONS[_op.name], *_spec)


def _scan_pickle(data: bytes, limits: Limits) -> int:
    """The opcode count of data.pkl (see `_scan_pickle_at`). Raises TorchZipError past a bound."""
    return _scan_pickle_at(data, limits)[0]


def _scan_pickle_at(data: bytes, limits: Limits, start: int = 0, what: str = "data.pkl",
                    budget: Optional[_Budget] = None) -> tuple[int, int]:
    """Walk the opcodes of the pickle that starts at `start` of `data` (`what` names it in reasons)
    without building anything, simulating the unpickler's stack with only how deeply each tuple nests.
    Returns (opcode count, the offset just past its STOP); raises TorchZipError past a bound.

    Tuples are the one container the C unpickler hashes recursively (as dict keys, set members) and
    they are immutable, so their nesting is known when they are built. Results of REDUCE/NEWOBJ are our
    stubs' objects: never a tuple nested deeper than one level. Argument contents are not decoded (the
    unpickler does that); only their lengths, and the memo indices, are read.
    """
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    max_depth = limits.max_depth
    max_ops = limits.max_pickle_ops
    end = len(data)
    pos = start
    n = 0

    def fence() -> int:
        return marks[-1] if marks else 0

    def pop(k: int) -> list[int]:
        if len(stack) - k < fence():
            raise _Malformed("stack underflow")
        items = stack[len(stack) - k:]
        del stack[len(stack) - k:]
        return items

    def pop_mark() -> list[int]:
        if not marks:
            raise _Malformed("no MARK")
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def top() -> int:
        if len(stack) <= fence():
            raise _Malformed("stack underflow")
        return stack[-1]

    def tuple_of(items: list[int]) -> int:
        d = 1 + max(items, default=0)
        if d > max_depth:
            raise TorchZipLimitError(f"{what} nests tuples deeper than {max_depth} levels")
        return d

    try:
        while True:
            if pos >= end:
                raise _Ends("data ends before STOP")
            spec = _OPCODES.get(data[pos])
            if spec is None:
                raise _Malformed(f"unknown opcode {data[pos]:#04x} at byte {pos}")
            name, a, kind, size, fmt = spec
            pos += 1
            argpos = pos
            if kind == _ARG_FIXED:
                pos += size
            elif kind == _ARG_LEN:
                if pos + size > end:
                    raise _Ends(f"{name} argument is truncated")
                length = struct.unpack_from(fmt, data, pos)[0]
                if length < 0:
                    raise _Malformed(f"{name} has a negative length")
                pos += size + length
            elif kind == _ARG_LINE:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    raise _Ends(f"{name} argument is truncated")
                pos = nl + 1
            elif kind == _ARG_LINE2:
                nl = data.find(b"\n", pos)
                nl = data.find(b"\n", nl + 1) if nl >= 0 else -1
                if nl < 0:
                    raise _Ends(f"{name} argument is truncated")
                pos = nl + 1
            if pos > end:
                raise _Ends(f"{name} argument is truncated")
            n += 1
            if n > max_ops:
                raise TorchZipLimitError(f"{what} has more than {max_ops} opcodes")
            if budget is not None and not n & 0xFFFF:
                budget.tick()

            if a == _A_PUSH:
                stack.append(0)
            elif a == _A_PUT or a == _A_GET:
                if kind == _ARG_LINE:
                    text = data[argpos:pos - 1]
                    if len(text) > 20 or not text.strip().isdigit():
                        raise _Malformed(f"{name} has a malformed index")
                    idx = int(text)
                else:
                    idx = int.from_bytes(data[argpos:pos], "little")
                if a == _A_GET:
                    if idx not in memo:
                        raise _Malformed(f"memo index {idx} is not set")
                    stack.append(memo[idx])
                else:
                    if idx > n:  # the C unpickler sizes its memo array by the largest index
                        raise TorchZipError(f"{what} uses memo index {idx} after {n} opcodes")
                    memo[idx] = top()
            elif a == _A_MEMOIZE:
                memo[len(memo)] = top()
            elif a == _A_MARK:
                marks.append(len(stack))
            elif a == _A_POP1:
                pop(1)
                top()
            elif a == _A_POP2:
                pop(2)
                top()
            elif a == _A_MARK_POP:
                pop_mark()
                if name != "POP_MARK":
                    top()
            elif a == _A_MARK_PUSH:
                pop_mark()
                stack.append(0)
            elif a == _A_TUPLE:
                stack.append(tuple_of(pop_mark()))
            elif a == _A_TUPLE_N:
                stack.append(tuple_of(pop(_TUPLE_N[name])))
            elif a == _A_PUSH_TUPLE0:
                stack.append(1)
            elif a == _A_POP2_PUSH:
                pop(2)
                stack.append(1)
            elif a == _A_POP3_PUSH:
                pop(3)
                stack.append(1)
            elif a == _A_POP1_PUSH:
                pop(1)
                stack.append(0)
            elif a == _A_DUP:
                stack.append(top())
            elif a == _A_POP:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop(1)
            elif a == _A_STOP:
                top()
                return n, pos
    except TorchZipError:
        raise
    except _Ends as e:
        raise _PickleEnds(f"{what} is malformed ({_describe(e)})") from None
    except (_Malformed, ValueError, struct.error, MemoryError) as e:
        raise TorchZipError(f"{what} is malformed ({_describe(e)})") from None


# --------------------------------------------------------------------------------------------------
# The unpickler

_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles data.pkl into our stubs and placeholders. Never imports a module, never calls anything
    but our stubs. Use `parse_pickle`, which runs the bounding scan first."""

    def __init__(self, file: Any, *, archive: str = "", limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(file, encoding="utf-8", errors="strict")
        self.archive = archive
        self.limits = limits
        self.storages: list[StorageRef] = []
        self._globals: dict[tuple[str, str], Any] = {}
        self._by_key: dict[tuple, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if type(module) is not str or type(name) is not str:
            raise TorchZipError("data.pkl names a global with a non-string name")
        # What the default find_class does for protocol < 3 (torch.save writes protocol 2 with
        # fix_imports, so a set is pickled as `__builtin__ set`): Python 2 names -> Python 3 names.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        found = self._globals.get(key)
        if found is not None:
            return found
        if len(self._globals) >= self.limits.max_globals:
            raise TorchZipLimitError(f"data.pkl names more than {self.limits.max_globals} globals")
        if len(module) > 512 or len(name) > 512:
            raise TorchZipError("data.pkl names a global with an overlong name")
        found = _STUBS.get(key)
        if found is None:
            found = _named(module, name)
        self._globals[key] = found
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise TorchZipError("data.pkl has a persistent id that is not a storage")
        _, stype, key, location, numel = pid
        if not (isinstance(stype, _Marker) and stype.kind == "storage"):
            raise TorchZipError("data.pkl has a storage of an unknown type")
        if type(key) is not str or not _KEY_RE.fullmatch(key) or ".." in key:
            raise TorchZipError("data.pkl has a storage with a malformed key")
        if type(location) is not str or len(location) > 128:
            raise TorchZipError(f"storage data/{key} has a malformed location")
        if type(numel) is not int or numel < 0 or numel >= 1 << 62:
            raise TorchZipError(f"storage data/{key} has a malformed size")
        ident = (key, stype.value, numel, location)
        ref = self._by_key.get(ident)
        if ref is None:
            if len(self.storages) >= self.limits.max_nodes:
                raise TorchZipLimitError(f"data.pkl names more than {self.limits.max_nodes} storages")
            ref = StorageRef(key, stype.value, numel, location, self.archive)
            self._by_key[ident] = ref
            self.storages.append(ref)
        return ref


def parse_pickle(data: bytes, *, archive: str = "", limits: Optional[Limits] = None,
                 budget: Optional[_Budget] = None) -> tuple[Any, list[StorageRef]]:
    """Unpickle `data` (the bytes of a data.pkl) safely within `limits`.

    Returns (root object, storages named by persistent ids). Raises TorchZipError, nothing else.
    """
    limits = limits or DEFAULT_LIMITS
    if len(data) > limits.max_pickle_bytes:
        raise TorchZipLimitError(f"data.pkl is larger than {limits.max_pickle_bytes} bytes")
    _scan_pickle_at(data, limits, budget=budget)
    up = SafeUnpickler(io.BytesIO(data), archive=archive, limits=limits)
    try:
        root = up.load()
    except TorchZipError:
        raise
    except RecursionError:
        raise TorchZipError("data.pkl is malformed (too deeply nested)") from None
    except MemoryError:
        raise TorchZipError("data.pkl needs more memory than is available to read") from None
    except Exception as e:  # UnpicklingError, TypeError from a malformed REDUCE, ...
        raise TorchZipError(f"data.pkl cannot be read ({_describe(e)})") from None
    return root, up.storages


# --------------------------------------------------------------------------------------------------
# Walking the result

_LEAVES = (int, float, complex, bool, str, bytes, bytearray, type(None), slice, _Marker, _NpDType,
           _NpScalar, _NpArray, StorageRef)


def _walk(root: Any, limits: Limits, budget: Optional[_Budget] = None) -> list[TensorRef]:
    """Visit everything reachable from root, iteratively; enforce the depth and node caps; return the
    distinct tensors."""
    max_depth, max_nodes = limits.max_depth, limits.max_nodes
    tensors: list[TensorRef] = []
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(root, 0)]
    nodes = 0
    while todo:
        obj, depth = todo.pop()
        nodes += 1
        if budget is not None and not nodes & 0xFFFF:
            budget.tick()
        if nodes > max_nodes:
            raise TorchZipLimitError(f"data.pkl holds more than {max_nodes} objects")
        if isinstance(obj, _LEAVES) or isinstance(obj, type) or callable(obj) and not isinstance(obj, Unknown):
            continue
        oid = id(obj)
        if oid in seen:
            continue
        seen.add(oid)
        if depth >= max_depth:
            raise TorchZipLimitError(f"data.pkl nests objects deeper than {max_depth} levels")
        d = depth + 1
        if isinstance(obj, TensorRef):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                todo.append((k, d))
                todo.append((v, d))
            if isinstance(obj, _ODict) and getattr(obj, "state", None) is not None:
                todo.append((obj.state, d))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend((x, d) for x in obj)
        elif isinstance(obj, Unknown):
            todo.append((obj.args, d))
            todo.append((obj.kwargs, d))
            todo.append((obj.state, d))
            if obj.items is not None:
                todo.extend((pair, d) for pair in obj.items)
            if obj.listitems is not None:
                todo.append((obj.listitems, d))
    return tensors


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
            raise TorchZipError("not a torch.save file (the zip archive is empty)")
        if "/" not in first:
            raise TorchZipError("not a torch.save file (its entries are not in an archive folder)")
        if self.name("data.pkl") not in records:
            raise TorchZipError("not a torch.save file (no data.pkl)")
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
            raise TorchZipError(f"CRC of {rel} fails")
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
                raise TorchZipError(f"CRC of {rel} fails")

    def read_tensor(self, ref: TensorRef) -> Any:
        i = self._index.get(self.name(f"data/{ref.storage.key}"))
        if i is None:
            raise TorchZipError(f"storage data/{ref.storage.key} is missing")
        return _read_values(self.fp, self._starts[i], self._sizes[i], ref, self.byteorder)


class _LegacyUnpickler(SafeUnpickler):
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
            raise type(e)(str(e).replace("data.pkl", "its pickle")) from None

    def close(self) -> None:
        self.fp.close()

    def __enter__(self) -> "_LegacyArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rel(self, name: str) -> str:
        return name

    def _pickle(self, data: bytes, pos: int, what: str, unpickler: type = SafeUnpickler) -> tuple[Any, int, Any]:
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
            raise TorchZipError("not a torch.save file (a pickle without torch's magic number)")
        proto, pos, _ = self._pickle(data, pos, "its protocol version")
        if type(proto) is not int or proto != _LEGACY_PROTOCOL:
            raise TorchZipError(f"not a torch.save file (legacy protocol version {_short(proto)}, not 1001)")
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
            raise type(e)(str(e).replace("data.pkl", "its pickle")) from None
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


def read_scalar(zf: zipfile.ZipFile, ref: TensorRef, *, byteorder: Optional[str] = None
                ) -> Union[int, float, bool, complex, list]:
    """The value of a small tensor (at most 16 elements) read from its storage entry in `zf`.

    Returns a Python number for a one-element tensor (any shape), else a flat row-major list. dtypes:
    float16/bfloat16/float32/float64, (u)int8..64, bool, complex. The archive's byteorder record is
    honoured unless `byteorder` ("little"/"big") is given. Raises TorchZipError.
    """
    if not isinstance(ref, TensorRef):
        raise TorchZipError("read_scalar needs a TensorRef")
    st = ref.storage
    try:
        info = zf.getinfo(st.entry)
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise TorchZipError(f"storage data/{st.key} is compressed")
        if byteorder is None:
            byteorder = "little"
            bo_name = f"{st.archive}/byteorder" if st.archive else "byteorder"
            if bo_name in zf.NameToInfo:
                bo_info = zf.getinfo(bo_name)
                if bo_info.file_size <= 16:
                    byteorder = "big" if zf.read(bo_info) == b"big" else "little"
        if byteorder not in ("little", "big"):
            raise TorchZipError("byteorder must be 'little' or 'big'")
        fp = zf.fp
        if fp is None:
            raise TorchZipError("the zip file is closed")
        start = _local_data_offset(fp, info)
        return _read_values(fp, start, info.file_size, ref, byteorder)
    except TorchZipError:
        raise
    except KeyError:
        raise TorchZipError(f"storage data/{st.key} is missing") from None
    except Exception as e:
        raise TorchZipError(f"storage data/{st.key} cannot be read ({_describe(e)})") from None


# --------------------------------------------------------------------------------------------------
# What the file says about itself


@dataclass
class ModelCheckpointState:
    """The state Lightning's ModelCheckpoint callback saved in a .ckpt (`callbacks["ModelCheckpoint{...}"]`)."""

    key: str
    monitor: Optional[str] = None
    mode: Optional[str] = None                 # "min"/"max", parsed from the callback's state key
    best_model_path: Optional[str] = None
    best_model_score: Optional[float] = None
    current_score: Optional[float] = None
    last_model_path: Optional[str] = None
    kth_best_model_path: Optional[str] = None
    kth_value: Optional[float] = None
    dirpath: Optional[str] = None
    best_k_models: dict[str, float] = field(default_factory=dict)


@dataclass
class LightningInfo:
    version: Optional[str] = None              # "pytorch-lightning_version"
    callbacks: list[str] = field(default_factory=list)   # the callback state keys
    model_checkpoints: list[ModelCheckpointState] = field(default_factory=list)


@dataclass
class TorchFileInfo:
    path: str
    kind: str                                  # "lightning" | "state_dict" | "dict" | "other"
    format: str = "zip"                        # "zip" (torch >= 1.6) | "legacy" (no checksums in the file)
    step: Optional[int] = None
    epoch: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    has_optimizer: bool = False
    state_dict_key: Optional[str] = None       # "state_dict", "model_state_dict", "model"; "" = bare state dict
    n_tensors: int = 0
    n_storages: int = 0
    storage_bytes: int = 0                     # sum of the sizes of the storage entries data.pkl names
    keys: list[str] = field(default_factory=list)         # top-level string keys, for a mapping
    byteorder: Optional[str] = None
    crc_verified: bool = False
    lightning: Optional[LightningInfo] = None


_STEP_KEYS = ("global_step", "step", "iter_num", "iteration")
_OPTIMIZER_KEYS = ("optimizer_states", "optimizer", "optimizer_state_dict")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_METRIC_KEYS = ("loss", "train_loss", "val_loss", "valid_loss", "eval_loss", "test_loss", "best_val_loss",
                "best_loss", "best_metric", "best_score", "metric", "score", "accuracy", "val_acc",
                "val_accuracy", "perplexity", "val_perplexity")
_MODE_RE = re.compile(r"'mode':\s*'(min|max)'")
_MONITOR_RE = re.compile(r"'monitor':\s*'([^']{1,256})'")


def _as_mapping(obj: Any) -> Optional[dict]:
    """A dict, OrderedDict, or a placeholder for a dict subclass that was filled by SETITEMS (Lightning's
    AttributeDict...), as a dict. Not the attributes of other pickled objects."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, Unknown) and obj.items is not None:
        try:
            return dict(obj.items)
        except (TypeError, RecursionError):
            return None
    return None


def _plain_int(v: Any) -> Optional[int]:
    return v if type(v) is int and 0 <= v < 10**15 else None


class _Extractor:
    def __init__(self, archive: Any, limits: Limits) -> None:
        self.archive = archive
        self.reads_left = limits.max_scalar_reads
        self.max_string = limits.max_string

    def number(self, v: Any) -> Optional[float]:
        """A plain finite number: int/float, a one-element float/int tensor, a numpy scalar."""
        if type(v) is TensorRef:
            if v.dtype not in _FLOAT_DTYPES | _INT_DTYPES or v.numel != 1 or self.reads_left <= 0:
                return None
            self.reads_left -= 1
            try:
                v = self.archive.read_tensor(v)
            except TorchZipError:
                return None
        elif type(v) is _NpScalar:
            v = v.value
        if type(v) in (int, float):
            f = float(v)
            return f if math.isfinite(f) else None
        return None

    def string(self, v: Any) -> Optional[str]:
        return v if type(v) is str and len(v) <= self.max_string else None


def _extract(path: str, root: Any, tensors: list[TensorRef], archive: Union[_Archive, "_LegacyArchive"], limits: Limits
             ) -> TorchFileInfo:
    x = _Extractor(archive, limits)
    info = TorchFileInfo(path=path, kind="other", n_tensors=len(tensors), byteorder=archive.byteorder)
    info.n_storages = len(archive.storage_keys)
    info.storage_bytes = archive.storage_bytes()
    info.format = "legacy" if archive.legacy else "zip"
    top = _as_mapping(root)
    if top is None:
        return info
    info.keys = [k for k in itertools.islice(top, 4096) if type(k) is str and len(k) <= 256][:256]

    if "pytorch-lightning_version" in top or all(k in top for k in ("global_step", "state_dict", "loops")):
        info.kind = "lightning"
    elif top and all(type(k) is str for k in top) and all(type(v) is TensorRef for v in top.values()):
        info.kind = "state_dict"
    else:
        info.kind = "dict"

    for k in _STEP_KEYS:
        if _plain_int(top.get(k)) is not None:
            info.step = top[k]
            break
    info.epoch = _plain_int(top.get("epoch"))

    for k in _OPTIMIZER_KEYS:
        v = top.get(k)
        # an optimizer state dict, Lightning's list of them, or a whole pickled optimizer object
        if _as_mapping(v) or isinstance(v, Unknown) or \
                (type(v) is list and any(_as_mapping(o) is not None for o in v)):
            info.has_optimizer = True
    if "state" in top and "param_groups" in top and type(top["param_groups"]) is list:
        info.has_optimizer = True  # the file is an optimizer state dict (HF optimizer.pt)

    if info.kind == "state_dict":
        info.state_dict_key = ""
    else:
        for k in _STATE_DICT_KEYS:
            m = _as_mapping(top.get(k))
            if m is not None and any(type(v) is TensorRef for v in m.values()):
                info.state_dict_key = k
                break

    for k in _METRIC_KEYS:
        if k in top:
            n = x.number(top[k])
            if n is not None:
                info.metrics[k] = n
    nested = _as_mapping(top.get("metrics"))
    if nested is not None:
        for k, v in itertools.islice(nested.items(), 256):
            if type(k) is str and len(k) <= 256 and k not in info.metrics:
                n = x.number(v)
                if n is not None:
                    info.metrics[k] = n

    if info.kind == "lightning":
        info.lightning = _lightning(top, x, info)
    return info


def _lightning(top: dict, x: _Extractor, info: TorchFileInfo) -> LightningInfo:
    li = LightningInfo(version=x.string(top.get("pytorch-lightning_version")))
    callbacks = _as_mapping(top.get("callbacks"))
    if callbacks is None:
        return li
    for key, state in itertools.islice(callbacks.items(), 1024):
        if type(key) is not str:
            continue
        li.callbacks.append(key[:512])
        state = _as_mapping(state)
        if not key.startswith("ModelCheckpoint") or state is None:
            continue
        mc = ModelCheckpointState(key=key[:512])
        mc.monitor = x.string(state.get("monitor"))
        if mc.monitor is None and "monitor" not in state:
            m = _MONITOR_RE.search(key)
            mc.monitor = m.group(1) if m else None
        m = _MODE_RE.search(key)
        mc.mode = m.group(1) if m else None
        for attr in ("best_model_path", "last_model_path", "kth_best_model_path", "dirpath"):
            setattr(mc, attr, x.string(state.get(attr)))
        for attr in ("best_model_score", "current_score", "kth_value"):
            setattr(mc, attr, x.number(state.get(attr)))
        best_k = _as_mapping(state.get("best_k_models"))
        if best_k is not None:
            for p, score in itertools.islice(best_k.items(), 10_000):
                p, score = x.string(p), x.number(score)
                if p is not None and score is not None:
                    mc.best_k_models[p] = score
        if mc.monitor and mc.current_score is not None and mc.monitor not in info.metrics:
            info.metrics[mc.monitor] = mc.current_score
        li.model_checkpoints.append(mc)
    return li


# --------------------------------------------------------------------------------------------------
# Entry points


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
            raise TorchZipError("not a torch.save file ckpt-daemon can check (torch's pre-1.0 tar format)")
        raise TorchZipError("not a torch.save file (neither a zip archive nor a legacy torch file)")
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


def check(path: Union[str, os.PathLike], verify_crc: bool = False, *, limits: Optional[Limits] = None
          ) -> Optional[str]:
    """None if `path` is a structurally complete torch.save file, else the reason it is not.

    A zip archive (torch >= 1.6) is structurally complete when its central directory is present and
    consistent and holds no more than the storages data.pkl names and a few records; every entry's
    local header is where the central directory says and its data fits before the next entry; no entry
    name is absolute, has '..' or a NUL; nothing is compressed or encrypted; data.pkl parses within the
    limits; every storage data.pkl names exists with at least the bytes it needs. With `verify_crc`,
    every entry is also streamed through its CRC-32. A legacy file is complete when its five pickles
    parse, its storages are those its pickle names, each with the element count it says, and they end
    exactly where the file ends (the format has no checksums). Never raises for a bad file.
    """
    limits = limits or DEFAULT_LIMITS
    try:
        with _open_archive(path, limits) as archive:
            archive.load()
            if verify_crc:
                archive.verify_crc()
        return None
    except TorchZipError as e:
        return str(e)
    except RecursionError:
        return "the file is malformed (too deeply nested)"
    except MemoryError:
        return "the file needs more memory than is available to check"
    except Exception as e:  # a bug of ours on some input: still a reason, never a crash of the caller
        return f"the file cannot be checked ({_describe(e)})"


def inspect(path: Union[str, os.PathLike], max_pickle_bytes: Optional[int] = None,
            verify_crc: bool = False, *, limits: Optional[Limits] = None) -> TorchFileInfo:
    """What a torch.save file says about itself. Reads only data.pkl (and tensors of one element that
    hold a metric or score); with `verify_crc`, streams every entry through its CRC-32 first.

    Legacy (non-zip) files are read the same way (`format` "legacy"). A file that is not structurally
    complete (see `check`) raises TorchZipError (TorchZipLimitError past a bound of `limits`); nothing
    else is raised. `max_pickle_bytes` overrides `limits.max_pickle_bytes` (64 MiB).
    """
    limits = limits or DEFAULT_LIMITS
    if max_pickle_bytes is not None:
        limits = replace(limits, max_pickle_bytes=max_pickle_bytes)
    spath = os.fspath(path)
    try:
        with _open_archive(spath, limits) as archive:
            root, _storages, tensors = archive.load()
            if verify_crc:
                archive.verify_crc()
            info = _extract(str(spath), root, tensors, archive, limits)
            info.crc_verified = verify_crc and not archive.legacy
            return info
    except TorchZipError:
        raise
    except RecursionError:
        raise TorchZipError("the file is malformed (too deeply nested)") from None
    except MemoryError:
        raise TorchZipError("the file needs more memory than is available to inspect") from None
    except Exception as e:
        raise TorchZipError(f"the file cannot be inspected ({_describe(e)})") from e


# --------------------------------------------------------------------------------------------------
# helpers


def _short(s: Any, n: int = 80) -> str:
    if type(s) is not str:
        return f"<{type(s).__name__}>"
    return repr(s if len(s) <= n else s[:n] + "...")


def _describe(e: BaseException) -> str:
    """An exception as text, without ever calling repr on untrusted objects."""
    name = type(e).__name__
    if isinstance(e, _Malformed) and e.args and type(e.args[0]) is str:
        return e.args[0]
    if all(type(a) in (str, int) for a in e.args):
        try:
            msg = str(e)
        except Exception:
            msg = ""
        msg = msg if len(msg) <= 200 else msg[:200] + "..."
        return f"{name}: {msg}" if msg else name
    return name
