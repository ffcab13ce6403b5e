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

`data.pkl` is read by `_SafeUnpickler`: `find_class` never imports. Names torch, numpy, collections and
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

The package: `bounds` (Limits, the CPU budget, the errors), `unpickle` (the opcode scan, the safe
unpickler, storage and tensor refs, the bounded walk), `archive` (the zip central directory and local
headers, the legacy format, reading small tensors), `extract` (check, inspect, read_scalar). Every error
carries a `kind` (`ckpt_daemon.store.problems.Kind`), so callers never read the message to classify it.

Public API (all callers use): `check`, `find_problem`, `inspect`, `read_scalar`, `parse_pickle`,
`TorchZipError`, `TorchZipLimitError`, `TorchZipTimeout`, `TorchFileInfo`, `TensorRef`, `Unknown`, `Limits`.
Stdlib only; never imports torch or numpy.
"""

from ckpt_daemon.store.torchzip.bounds import Limits, TorchZipError, TorchZipLimitError, TorchZipTimeout
from ckpt_daemon.store.torchzip.extract import TorchFileInfo, check, find_problem, inspect, read_scalar
from ckpt_daemon.store.torchzip.unpickle import TensorRef, Unknown, parse_pickle

__all__ = [
    "Limits",
    "TensorRef",
    "TorchFileInfo",
    "TorchZipError",
    "TorchZipLimitError",
    "TorchZipTimeout",
    "Unknown",
    "check",
    "find_problem",
    "inspect",
    "parse_pickle",
    "read_scalar",
]
