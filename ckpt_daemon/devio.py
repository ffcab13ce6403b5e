"""The torch side of training on a device: applying ckpt_daemon/device.py's decisions, host memory the
GPU copies into at full speed, and verified loads straight onto the GPU.

- `setup(trainer_cfg, job)`: the placement (device.place) applied: cuda:LOCAL_RANK bound before any
  process group exists, deterministic kernels, `autocast` and `grad_scaler` for the precision.
- `HostMapping`: a shared-memory mapping (a memory-first slot) made ready for device copies when it is
  reserved: its pages faulted in (MADV_POPULATE_WRITE), and with a GPU state, registered as pinned host
  memory (cudaHostRegister), so that a device-to-slot copy runs at the DMA engine's speed instead of
  through the driver's pageable staging (measured on an H200: 0.083 s against 0.31 s, and 3.3 s when the
  pages were not yet there; ../shared/GPU.md). Pinned pages cannot be swapped out.
- `read_to_device(jobs, device)`: files (or mapped buffers) read in pieces into pinned buffers, each piece
  hashed while the next is read and copied to the device while the next is hashed: a verified load costs
  the read, not read + hash + copy.

Nothing here initialises CUDA unless the state is on a GPU (or a GPU device is asked for).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ckpt_daemon import device as dv
from ckpt_daemon.fsutil import new_hasher, record_checksum
from ckpt_daemon.store.safetensors_file import ChecksumMismatch, same_file

log = logging.getLogger("ckpt_daemon.devio")


# ------------------------------------------------------------------------------------------ placement
def present(want_cuda: bool = True) -> dv.Present:
    """What torch reports about this machine (CUDA is not initialised when want_cuda is False)."""
    cuda = bool(want_cuda and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    bf16 = False
    if cuda and gpus:
        try:
            bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.4 has no including_emulation (and does not emulate)
            bf16 = bool(torch.cuda.is_bf16_supported())
    scaler = hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")
    return dv.Present(cuda=cuda, gpus=gpus, bf16=bf16, cpu_fp16_scaler=scaler)


def setup(device: str, precision: str, deterministic: bool, job: dv.Job) -> dv.Placement:
    """Decide the placement and apply it to this process: bind the GPU (before torch.distributed starts,
    so NCCL and every collective use this rank's GPU), set deterministic kernels. Raises DeviceError."""
    p = dv.place(device, precision, deterministic, present(want_cuda=device != "cpu"), job)
    for k, v in dv.deterministic_env(os.environ, p).items():
        os.environ[k] = v  # read by cuBLAS when its first handle is made, i.e. after this
    if p.device_type == "cuda":
        torch.cuda.set_device(p.index)
    if p.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return p


def autocast(p: dv.Placement):
    """The forward pass's autocast context for the placement's precision (none for fp32)."""
    if p.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device_type, dtype=getattr(torch, p.autocast_dtype))


def grad_scaler(p: dv.Placement):
    """A gradient scaler for fp16 (None otherwise); its state goes into every checkpoint."""
    if not p.grad_scaler:
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(p.device_type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3 (device.place allows fp16 there only on a GPU)


def report(p: dv.Placement) -> dict:
    """The heartbeat's device record (device.heartbeat_device reads it back)."""
    rec: dict = {"device": p.device, "precision": p.precision, "deterministic": p.deterministic}
    if p.device_type == "cuda":
        i = p.index or 0
        rec["name"] = torch.cuda.get_device_name(i)
        rec["memory"] = {"allocated": int(torch.cuda.memory_allocated(i)), "reserved": int(torch.cuda.memory_reserved(i)),
                         "total": int(_total_memory(i))}
    else:
        rec["name"] = "cpu"
        rss = _rss()
        if rss is not None:
            rec["memory"] = {"rss": rss}
    return rec


_TOTAL: dict[int, int] = {}


def _total_memory(i: int) -> int:
    if i not in _TOTAL:
        _TOTAL[i] = torch.cuda.get_device_properties(i).total_memory
    return _TOTAL[i]


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def is_gpu(location: Any) -> bool:
    """Whether a map_location names a CUDA device (without initialising CUDA for one that does not)."""
    if isinstance(location, torch.device):
        return location.type == "cuda"
    return isinstance(location, str) and (location == "cuda" or location.startswith("cuda:"))


# ---------------------------------------------------------------------------------- host memory
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
POPULATE_PIECE = 256 << 20
PAGE = mmap.PAGESIZE
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def address_of(buf) -> int:
    """The address of a writable buffer (an mmap) for the C calls below."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def populate(buf, length: Optional[int] = None) -> str:
    """Fault in the pages of [0, length) of a shared writable mapping without changing a byte: page-table
    entries made now, in large batches, instead of one fault per 4 KiB page inside a save's copy. Returns
    how: "populate" (madvise(MADV_POPULATE_WRITE), Linux 5.14+, the GIL released), "touch" (a read of one
    byte per page where the kernel lacks it) or "none" (nothing to do)."""
    from ckpt_daemon.store.safetensors_file import _libc_madvise

    n = len(buf) if length is None else min(length, len(buf))
    if n <= 0:
        return "none"
    fn = _libc_madvise()
    if fn is not None:
        addr = address_of(buf)
        for off in range(0, n, POPULATE_PIECE):
            if fn(addr + off, min(POPULATE_PIECE, n - off), MADV_POPULATE_WRITE) != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM) and off == 0:
                    break  # an older kernel: touch instead
                raise OSError(err, f"cannot fault in the memory slot's pages: {os.strerror(err)}")
        else:
            return "populate"
    arr = np.frombuffer(buf, dtype=np.uint8, count=n)
    int(arr[::PAGE].sum())  # one read per page maps it (a shared mapping needs no write for that)
    return "touch"


def _cudart():
    try:
        rt = torch.cuda.cudart()
    except (AssertionError, RuntimeError, AttributeError):
        return None
    return rt if hasattr(rt, "cudaHostRegister") and hasattr(rt, "cudaHostUnregister") else None


class HostMapping:
    """A mapping made ready for device copies: faulted in, and registered with CUDA while `pinned`.
    `release()` (before the mapping is closed) unregisters it."""

    def __init__(self, buf, length: int):
        self.buf = buf
        self.length = int(length)
        self.pinned = False
        self._addr: Optional[int] = None
        self.how = populate(buf, self.length)

    def pin(self) -> bool:
        """Register with cudaHostRegister (once). False, with a warning, where CUDA or the call is missing or
        it fails: copies then go through the driver's pageable staging, slower but correct."""
        if self.pinned or self.length <= 0:
            return self.pinned
        rt = _cudart() if torch.cuda.is_available() else None
        if rt is None:
            _warn_once("no-register", "this torch cannot register host memory with CUDA (no cudaHostRegister): "
                       "device copies into memory checkpoints go through pageable memory (slower)")
            return False
        addr = address_of(self.buf)
        err = int(rt.cudaHostRegister(addr, self.length, 1))  # 1: cudaHostRegisterPortable
        if err != 0:
            _warn_once("register-failed", "cudaHostRegister of %d bytes failed (cudaError %d): device copies into "
                       "memory checkpoints go through pageable memory (slower)", self.length, err)
            return False
        self._addr, self.pinned = addr, True
        return True

    def release(self) -> None:
        if self.pinned and self._addr is not None:
            rt = _cudart()
            err = int(rt.cudaHostUnregister(self._addr)) if rt is not None else -1
            if err != 0:
                log.warning("cudaHostUnregister failed (cudaError %d); the slot is unmapped regardless", err)
        self.pinned, self._addr, self.buf = False, None, None


def state_on_gpu(tensors) -> bool:
    return any(getattr(t, "is_cuda", False) for t in tensors)


def _unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer `.optimizer`,
    Lightning's LightningOptimizer `._optimizer`), a few levels at most."""
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or inner is opt:
            return opt
        opt = inner
    return opt


def estimate_state_bytes(model: torch.nn.Module, optimizer: Any = None) -> int:
    """Bytes of a full training state as a checkpoint will hold it: the model's state dict, the optimizer's
    state, and for parameters the optimizer holds no state for yet (created at its first step), what its
    kind creates: Adam/AdamW two moments (three with amsgrad), SGD with momentum one buffer. `optimizer`
    may be a list of them (Lightning) or a framework's wrapper. Used to reserve memory slots before the
    first save; a larger state later grows them then."""
    if isinstance(optimizer, (list, tuple)):
        return estimate_state_bytes(model) + sum(estimate_state_bytes(model, o) - estimate_state_bytes(model)
                                                 for o in optimizer if o is not None)
    optimizer = _unwrap_optimizer(optimizer) if optimizer is not None else None
    seen: set = set()
    total = 0
    for t in getattr(model, "module", model).state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue  # tied: stored once
        seen.add(key)
        total += t.numel() * t.element_size()
    if optimizer is None:
        return total
    kind = type(optimizer).__name__
    for group in getattr(optimizer, "param_groups", []):
        per = 0
        if kind in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax"):
            per = 3 if group.get("amsgrad") else 2
        elif kind == "SGD" and group.get("momentum"):
            per = 1
        elif kind in ("Adagrad", "RMSprop", "Adadelta"):
            per = 1 + bool(group.get("momentum")) + bool(group.get("centered"))
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
            else:
                total += per * p.numel() * p.element_size() + (4 if per and kind != "SGD" else 0)  # + a float32 step
    return total


# ------------------------------------------------------------------------------------ verified load
READ_PIECE = 16 << 20  # one read, one hash update, one host-to-device copy
BUFFERS_PER_LANE = 3  # a piece being read, one being hashed, one in the copy engine


class ReadError(ChecksumMismatch):
    """A piece could not be read, or a file fails its checksum (the message names it)."""


@dataclass
class ReadJob:
    """One file (a path) or mapped buffer (a uint8 numpy array) to bring onto the device; `digest` None
    when it need not be hashed (verified by the daemon moments ago, see verifyonce)."""

    name: str
    source: Union[str, os.PathLike, int, np.ndarray]  # a path, an open file descriptor (not closed), or bytes
    size: int
    algo: Optional[str] = None
    digest: Optional[str] = None


class _Lane:
    """Pinned buffers and a copy stream, reused for every file the lane reads."""

    def __init__(self, device: torch.device, piece: int):
        gpu = device.type == "cuda"
        self.bufs = [torch.empty(piece, dtype=torch.uint8, pin_memory=gpu) for _ in range(BUFFERS_PER_LANE)]
        self.views = [b.numpy() for b in self.bufs]
        self.stream = torch.cuda.Stream(device) if gpu else None
        if self.stream is not None:
            # the destination tensors were just allocated on the current stream, whose earlier work may still
            # use that memory (a block the caching allocator reuses): the lane's copies come after it
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.events: list = [None] * BUFFERS_PER_LANE


def _reader(source) -> tuple[Callable[[int, np.ndarray], int], Callable[[], None]]:
    if isinstance(source, np.ndarray):
        def read(off: int, dst: np.ndarray) -> int:
            part = source[off:off + len(dst)]
            np.copyto(dst[:len(part)], part)
            return len(part)
        return read, lambda: None
    owned = not isinstance(source, int)
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if owned else source

    def read_file(off: int, dst: np.ndarray) -> int:
        got = 0
        mv = memoryview(dst)
        while got < len(dst):
            n = os.preadv(fd, [mv[got:]], off + got)  # releases the GIL while the disk works
            if n == 0:
                break
            got += n
        return got
    return read_file, (lambda: os.close(fd)) if owned else (lambda: None)


def read_to_device(jobs: list[ReadJob], device: Union[str, torch.device], piece: int = READ_PIECE,
                   lanes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Each job's bytes as a uint8 tensor on `device`, every digest checked before this returns (raises
    ReadError naming a bad file; nothing of a failed load is returned). Per lane (one file at a time,
    several files in flight): a reader thread fills pinned buffers in order, a follower hashes each piece
    and queues its copy to the device on the lane's stream; a buffer is read into again only when its copy
    is done. On a CPU device the same pipeline copies (used by the tests and on machines without a GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out = {j.name: torch.empty(j.size, dtype=torch.uint8, device=device) for j in jobs}
    if not jobs:
        return out
    ncpu = os.cpu_count() or 1
    lanes = max(1, min(len(jobs), lanes or min(4, max(1, ncpu // 2))))
    spare = ncpu >= 3 * lanes  # cores beyond a reader and a hasher per lane: blake3 spreads each piece over them
    hashers = {}
    for j in jobs:
        if j.digest is not None:
            try:
                hashers[j.name] = new_hasher(j.algo or "sha256", threads=spare)
            except (ValueError, LookupError) as exc:
                raise ReadError(f"{j.name} cannot be verified: {exc}") from None
    order = sorted(jobs, key=lambda j: -j.size)  # largest first: the lanes finish together
    work: "queue.Queue[Optional[ReadJob]]" = queue.Queue()
    for j in order:
        work.put(j)
    errors: list[str] = []
    stop = threading.Event()

    def run_lane(lane: _Lane) -> None:
        while not stop.is_set():
            try:
                job = work.get_nowait()
            except queue.Empty:
                return
            try:
                one_file(lane, job)
            except Exception as exc:  # noqa: BLE001 - reported with the file's name; the others stop
                errors.append(str(exc) if isinstance(exc, ReadError) else f"{job.name} could not be read ({exc})")
                stop.set()
        return

    def one_file(lane: _Lane, job: ReadJob) -> None:
        dst = out[job.name]
        h = hashers.get(job.name)
        read, close = _reader(job.source)
        pieces: "queue.Queue[Optional[tuple[int, int, int]]]" = queue.Queue(maxsize=BUFFERS_PER_LANE - 1)
        free = [threading.Semaphore(1) for _ in range(BUFFERS_PER_LANE)]
        failed: list[BaseException] = []

        def follow() -> None:  # hash piece k while piece k+1 is read; then queue its copy
            while (item := pieces.get()) is not None:
                k, off, n = item
                try:
                    if not failed and not stop.is_set():
                        if h is not None:
                            h.update(lane.views[k][:n])
                        if lane.stream is not None:
                            with torch.cuda.stream(lane.stream):
                                dst[off:off + n].copy_(lane.bufs[k][:n], non_blocking=True)
                                ev = torch.cuda.Event()
                                ev.record(lane.stream)
                            lane.events[k] = ev
                        else:
                            dst[off:off + n].copy_(lane.bufs[k][:n])
                except BaseException as exc:  # noqa: BLE001
                    failed.append(exc)
                finally:
                    free[k].release()

        t = threading.Thread(target=follow, daemon=True, name=f"devload-{job.name[:20]}")
        t.start()
        try:
            for i, off in enumerate(range(0, job.size, piece)):
                if failed or stop.is_set():
                    break
                k = i % BUFFERS_PER_LANE
                free[k].acquire()
                if lane.events[k] is not None:
                    lane.events[k].synchronize()  # its previous copy to the device is done
                    lane.events[k] = None
                n = min(piece, job.size - off)
                got = read(off, lane.views[k][:n])
                if got != n:
                    free[k].release()
                    raise ReadError(f"{job.name} could not be read: it ended at {off + got} bytes, the manifest says "
                                    f"{job.size} (it is shorter than when it was listed, or the disk failed)")
                pieces.put((k, off, n))
        finally:
            pieces.put(None)
            t.join()
            close()
        if failed:
            raise failed[0]
        if h is not None and not stop.is_set() and h.hexdigest() != job.digest:
            raise ReadError(f"{job.name} fails its {job.algo} checksum (the file changed after it was written)")

    piece = max(PAGE, min(piece, max(j.size for j in jobs)))
    pool = [_Lane(device, piece) for _ in range(lanes)]
    threads = [threading.Thread(target=run_lane, args=(ln,), daemon=True, name=f"devload-lane-{i}")
               for i, ln in enumerate(pool[1:], 1)]
    for th in threads:
        th.start()
    try:
        run_lane(pool[0])
    except BaseException:
        stop.set()
        raise
    finally:
        for th in threads:
            th.join()
        for ln in pool:
            if ln.stream is not None:
                ln.stream.synchronize()  # every copy landed before the tensors are used (on any stream)
    if errors:
        raise ReadError(errors[0])
    return out


def keep_on_host(name: str, t: torch.Tensor) -> bool:
    """Which loaded state tensors stay on the CPU when a checkpoint is loaded onto a GPU: everything but the
    optimizer's (RNG states must be CPU tensors; numpy arrays come back as numpy), and 0-dim tensors (an
    optimizer's `step`, which a fresh torch optimizer keeps on the CPU unless it is capturable or fused; those
    move it to the GPU themselves when the state is loaded)."""
    return not name.startswith("optimizer/") or t.dim() == 0


def host_side(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with the ones `keep_on_host` names copied to the CPU (the rest stay on the device)."""
    return {k: (v.cpu() if v.device.type != "cpu" and keep_on_host(k, v) else v) for k, v in tensors.items()}


def read_files(folder: Path, records: dict[str, dict], trusted: Optional[dict], verify: bool,
               device: Union[str, torch.device]) -> dict[str, torch.Tensor]:
    """The files `records` names (name -> manifest record) of a checkpoint folder as uint8 tensors on
    `device`, each checked against its size and checksum while it is read (`read_to_device`), except the
    ones the daemon verified moments ago and that are unchanged since (`trusted`: verifyonce's stat
    records, compared with the opened file's). Raises ChecksumMismatch (ReadError) naming a bad file."""
    fds: list[int] = []
    jobs: list[ReadJob] = []
    try:
        for name, rec in records.items():
            algo, digest = record_checksum(rec)
            fd = os.open(Path(folder) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(fd)
            st = os.fstat(fd)
            if st.st_size != rec["size"]:
                raise ReadError(f"{name} has {st.st_size} bytes, the manifest says {rec['size']}")
            hashed = verify and not same_file(st, trusted.get(name) if trusted else None)
            jobs.append(ReadJob(name, fd, st.st_size, algo if hashed else None, digest if hashed else None))
        return read_to_device(jobs, device)
    finally:
        for fd in fds:
            os.close(fd)
