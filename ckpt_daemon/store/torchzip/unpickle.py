"""data.pkl, unpickled safely: the opcode scan that bounds what the C unpickler does, the unpickler whose
`find_class` never imports (torch/numpy/collections names map to stubs, every other name to an `Unknown`
placeholder), persistent ids as `StorageRef`s, tensors as `TensorRef`s, and the bounded walk of the result."""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import pickletools
import re
import struct
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Optional, Union

from ckpt_daemon.store import dtypes
from ckpt_daemon.store.torchzip.bounds import (
    _DEFAULT_LIMITS,
    Limits,
    TorchZipError,
    TorchZipLimitError,
    _Budget,
    _describe,
    _Malformed,
    _short,
)

# --------------------------------------------------------------------------------------------------
# dtypes

# name -> (itemsize, struct format of one element or a special decoder name, or None if not decodable)
_DTYPES: dict[str, tuple[Optional[int], Optional[str]]] = {n: (d.itemsize, d.fmt) for n, d in dtypes.BY_TORCH_NAME.items()}

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


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles data.pkl into our stubs and placeholders. Never imports a module, never calls anything
    but our stubs. Use `parse_pickle`, which runs the bounding scan first."""

    def __init__(self, file: Any, *, archive: str = "", limits: Limits = _DEFAULT_LIMITS) -> None:
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
    limits = limits or _DEFAULT_LIMITS
    if len(data) > limits.max_pickle_bytes:
        raise TorchZipLimitError(f"data.pkl is larger than {limits.max_pickle_bytes} bytes")
    _scan_pickle_at(data, limits, budget=budget)
    up = _SafeUnpickler(io.BytesIO(data), archive=archive, limits=limits)
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
