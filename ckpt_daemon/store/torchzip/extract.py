"""What callers need from a torch.save file: whether it is complete (`check`, `find_problem`), what it says
about itself (`inspect`: step, epoch, metrics, optimizer, Lightning's ModelCheckpoint state) and the
value of a small tensor (`read_scalar`)."""

from __future__ import annotations

import itertools
import math
import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from ckpt_daemon.store.problems import Kind, Problem
from ckpt_daemon.store.torchzip.archive import _Archive, _LegacyArchive, _local_data_offset, _open_archive, _read_values
from ckpt_daemon.store.torchzip.bounds import _DEFAULT_LIMITS, Limits, TorchZipError, _describe
from ckpt_daemon.store.torchzip.unpickle import _FLOAT_DTYPES, _INT_DTYPES, TensorRef, Unknown, _NpScalar

# --------------------------------------------------------------------------------------------------
# Small tensors


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


def find_problem(path: Union[str, os.PathLike], verify_crc: bool = False, *, limits: Optional[Limits] = None
                 ) -> Optional[Problem]:
    """None if `path` is a structurally complete torch.save file, else what is wrong with it: a `Problem`
    whose `kind` says what that makes the file (see `TorchZipError`) and whose `message` is the reason.

    A zip archive (torch >= 1.6) is structurally complete when its central directory is present and
    consistent and holds no more than the storages data.pkl names and a few records; every entry's
    local header is where the central directory says and its data fits before the next entry; no entry
    name is absolute, has '..' or a NUL; nothing is compressed or encrypted; data.pkl parses within the
    limits; every storage data.pkl names exists with at least the bytes it needs. With `verify_crc`,
    every entry is also streamed through its CRC-32. A legacy file is complete when its five pickles
    parse, its storages are those its pickle names, each with the element count it says, and they end
    exactly where the file ends (the format has no checksums). Never raises for a bad file.
    """
    limits = limits or _DEFAULT_LIMITS
    try:
        with _open_archive(path, limits) as archive:
            archive.load()
            if verify_crc:
                archive.verify_crc()
        return None
    except TorchZipError as e:
        return e.problem
    except RecursionError:
        return Problem(Kind.INCOMPLETE, "the file is malformed (too deeply nested)")
    except MemoryError:
        return Problem(Kind.INCOMPLETE, "the file needs more memory than is available to check")
    except Exception as e:  # a bug of ours on some input: still a reason, never a crash of the caller
        return Problem(Kind.INCOMPLETE, f"the file cannot be checked ({_describe(e)})")


def check(path: Union[str, os.PathLike], verify_crc: bool = False, *, limits: Optional[Limits] = None
          ) -> Optional[str]:
    """None if `path` is a structurally complete torch.save file, else the reason it is not (the message
    of `find_problem`, which also says its kind). Never raises for a bad file."""
    problem = find_problem(path, verify_crc, limits=limits)
    return None if problem is None else problem.message


def inspect(path: Union[str, os.PathLike], max_pickle_bytes: Optional[int] = None,
            verify_crc: bool = False, *, limits: Optional[Limits] = None) -> TorchFileInfo:
    """What a torch.save file says about itself. Reads only data.pkl (and tensors of one element that
    hold a metric or score); with `verify_crc`, streams every entry through its CRC-32 first.

    Legacy (non-zip) files are read the same way (`format` "legacy"). A file that is not structurally
    complete (see `check`) raises TorchZipError (TorchZipLimitError past a bound of `limits`); nothing
    else is raised. `max_pickle_bytes` overrides `limits.max_pickle_bytes` (64 MiB).
    """
    limits = limits or _DEFAULT_LIMITS
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
