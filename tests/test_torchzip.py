"""ckpt_daemon.store.torchzip: what the daemon learns from other trainers' torch.save files, without torch,
without unpickling, and without being hurt by a hostile file.

Real files are written with torch.save (and a real Lightning run); hostile ones are built byte by byte.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import enum
import io
import os
import pathlib
import pickle
import random
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_daemon.store import torchzip as tz
from ckpt_daemon.store.problems import Kind
from ckpt_daemon.store.torchzip import (
    Limits,
    TensorRef,
    TorchFileInfo,
    TorchZipError,
    Unknown,
    check,
    inspect,
    parse_pickle,
    read_scalar,
)
from ckpt_daemon.store.torchzip import unpickle as tzu
from tests.helpers import empty_entries_zip

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# helpers


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name), data)
    return path


def prefix_of(path: Path) -> str:
    return next(iter(zip_entries(path))).split("/", 1)[0]


def rezip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, drop=(), compress=False) -> Path:
    """Copy a torch zip entry by entry (CRCs recomputed), replacing or dropping entries by the name
    relative to the archive folder."""
    replace = replace or {}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in zip_entries(src).items():
            rel = name.split("/", 1)[1]
            if rel in drop:
                continue
            z.writestr(name, replace.get(rel, data))
    return dst


def data_ranges(raw: bytes) -> dict[str, tuple[int, int]]:
    """[start, end) of each entry's data, from the zip headers (independently of torchzip)."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        for i in z.infolist():
            n, m = struct.unpack_from("<HH", raw, i.header_offset + 26)
            start = i.header_offset + 30 + n + m
            out[i.filename] = (start, start + i.compress_size)
    return out


def flip(path: Path, pos: int, mask: int = 0x40) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= mask
    path.write_bytes(bytes(raw))


class FakeStorage:
    """Becomes a torch persistent id ('storage', <storage class>, key, location, numel)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    """Pickles exactly as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict()))


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_like_pickle(obj) -> bytes:
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, prefix="archive",
            version=True) -> Path:
    """A torch.save-shaped zip around a data.pkl we wrote ourselves."""
    entries = {f"{prefix}/data.pkl": data_pkl, f"{prefix}/byteorder": b"little"}
    for key, data in (storages or {}).items():
        entries[f"{prefix}/data/{key}"] = data
    if version:
        entries[f"{prefix}/version"] = b"3\n"
    return write_zip(path, entries)


def count_tensors(obj) -> int:
    """Distinct tensors reachable in a torch.load'ed object."""
    seen, todo = set(), [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            seen.add(id(o))
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return len(seen)


def assert_reason_or_error(path: Path) -> str:
    """A bad file: check gives a reason (with and without CRC), inspect raises TorchZipError only."""
    reason = check(path)
    assert isinstance(reason, str) and reason, reason
    assert isinstance(check(path, verify_crc=True), str)
    with pytest.raises(TorchZipError):
        inspect(path)
    return reason


def tiny_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "wte": torch.nn.Embedding(16, 8),
        "h": torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)),
        "lm_head": torch.nn.Linear(8, 16, bias=False),
    })


def adamw_after_one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    opt.step()
    return opt


# ------------------------------------------------------------------------------------------------
# Real files from real trainers


def test_nanogpt_style_checkpoint(tmp_path):
    model = tiny_gpt()
    opt = adamw_after_one_step(model)
    best = torch.tensor(1.2345)  # nanoGPT keeps the mean of a loss tensor: a 0-dim tensor
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": {"n_layer": 1},
            "iter_num": 500, "best_val_loss": best, "config": {"lr": 1e-3, "dataset": "shakespeare"}}
    p = save(ckpt, tmp_path / "model_step_500.pt")

    assert check(p) is None
    assert check(p, verify_crc=True) is None
    info = inspect(p)
    assert info.kind == "dict"
    assert info.step == 500
    assert info.epoch is None
    assert info.metrics == {"best_val_loss": best.item()}
    assert info.has_optimizer is True
    assert info.state_dict_key == "model"
    assert info.n_tensors == count_tensors(torch.load(p, weights_only=True))
    assert info.byteorder == "little"
    assert set(info.keys) == set(ckpt)
    assert info.lightning is None


def test_step_dict_with_model_and_optimizer_state_dicts(tmp_path):
    model = tiny_gpt()
    opt = adamw_after_one_step(model)
    p = save({"step": 1200, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
              "loss": 0.5, "config": {"batch_size": 8}}, tmp_path / "rolling_step_001200.pt")
    info = inspect(p, verify_crc=True)
    assert info.crc_verified is True
    assert (info.kind, info.step, info.state_dict_key, info.has_optimizer) == \
        ("dict", 1200, "model_state_dict", True)
    assert info.metrics == {"loss": 0.5}
    assert info.storage_bytes == sum(
        t.untyped_storage().nbytes() for t in model.state_dict().values()) + sum(
        t.untyped_storage().nbytes() for s in opt.state_dict()["state"].values() for t in s.values())


def test_bare_state_dict_like_pytorch_model_bin(tmp_path):
    model = tiny_gpt()
    p = save(model.state_dict(), tmp_path / "pytorch_model.bin")
    info = inspect(p)
    assert info.kind == "state_dict"
    assert info.state_dict_key == ""
    assert info.step is None and info.has_optimizer is False
    assert info.n_tensors == len(model.state_dict())
    assert info.keys == list(model.state_dict())


def test_hf_optimizer_scheduler_and_rng_files(tmp_path):
    model = tiny_gpt()
    opt = adamw_after_one_step(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.step()
    sched.step()

    o = inspect(save(opt.state_dict(), tmp_path / "optimizer.pt"))
    assert (o.kind, o.has_optimizer, o.step, o.state_dict_key) == ("dict", True, None, None)
    n_params = len(list(model.parameters()))
    assert o.n_tensors == 3 * n_params  # step, exp_avg, exp_avg_sq per parameter

    s = inspect(save(sched.state_dict(), tmp_path / "scheduler.pt"))
    assert (s.kind, s.has_optimizer, s.n_tensors, s.step) == ("dict", False, 0, None)

    random.seed(3)
    np.random.seed(3)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    p = save(rng, tmp_path / "rng_state.pth")
    assert check(p, verify_crc=True) is None
    r = inspect(p)
    assert (r.kind, r.n_tensors, r.has_optimizer) == ("dict", 1, False)
    # The numpy state is read into placeholders without numpy: its 624-word key is an array of shape (624,).
    root, _ = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"])
    assert root["numpy"][0] == "MT19937"
    assert root["numpy"][1].shape == (624,) and root["numpy"][1].dtype.name == "u4"
    assert root["python"] == random.getstate()


class Strategy(enum.Enum):
    STEPS = "steps"


@dataclasses.dataclass
class FakeTrainingArguments:
    """Stands for transformers.TrainingArguments, which HF saves with torch.save as training_args.bin."""

    output_dir: str = "out"
    learning_rate: float = 5e-5
    save_strategy: Strategy = Strategy.STEPS
    logging_dir: pathlib.Path = pathlib.Path("/tmp/logs")


def test_pickled_objects_of_user_classes_are_read_not_run(tmp_path):
    p = save(FakeTrainingArguments(), tmp_path / "training_args.bin")
    assert check(p, verify_crc=True) is None
    info = inspect(p)
    assert info.kind == "other" and info.step is None and info.n_tensors == 0
    root, _ = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"])
    assert isinstance(root, Unknown)
    assert (root.module, root.name) == (__name__, "FakeTrainingArguments")
    assert root.state["learning_rate"] == 5e-5
    assert root.state["logging_dir"] == "/tmp/logs"
    enum_value = root.state["save_strategy"]
    assert (enum_value.module, enum_value.name, enum_value.args) == (__name__, "Strategy", ("steps",))

    odd = {"step": 42, "epoch": 3, "args": argparse.Namespace(lr=0.1), "path": pathlib.Path("/x/y"),
           "tags": {"a", "b"}, "frozen": frozenset({(1, 2)}), "z": complex(1, 2), "raw": b"\x00\xff",
           "buf": bytearray(b"ab"), "when": datetime.datetime(2024, 1, 2), "cfg": FakeTrainingArguments(),
           "metrics": {"val_loss": np.float64(0.25), "acc": 0.9, "note": "x"},
           "loss": torch.tensor(0.5, dtype=torch.bfloat16), "counts": collections.Counter("aab"),
           "dd": collections.defaultdict(list, {"k": [1]}), "od": collections.OrderedDict(a=1)}
    p = save(odd, tmp_path / "odd.pt")
    assert check(p, verify_crc=True) is None
    info = inspect(p)
    assert (info.kind, info.step, info.epoch) == ("dict", 42, 3)
    assert info.metrics == {"loss": 0.5, "val_loss": 0.25, "acc": 0.9}
    root, _ = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"])
    assert root["tags"] == {"a", "b"} and root["frozen"] == frozenset({(1, 2)})
    assert root["z"] == complex(1, 2) and root["raw"] == b"\x00\xff" and root["buf"] == bytearray(b"ab")
    assert root["path"] == "/x/y" and root["args"].state == {"lr": 0.1}
    assert root["counts"] == {"a": 2, "b": 1} and root["dd"] == {"k": [1]} and root["od"] == {"a": 1}


def test_a_whole_pickled_module_is_placeholders_and_tensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    p = save(model, tmp_path / "model.pt")
    assert check(p, verify_crc=True) is None
    info = inspect(p)
    assert info.kind == "other"
    assert info.n_tensors == len(model.state_dict())  # 4 parameters + 3 buffers
    root, _ = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"])
    assert (root.module, root.name) == ("torch.nn.modules.container", "Sequential")


def test_fields_of_the_wrong_type_are_left_out(tmp_path):
    p = save({"global_step": "12", "step": True, "iter_num": -1, "iteration": 10**16, "epoch": 2.0,
              "loss": float("nan"), "val_loss": "0.3", "best_metric": torch.zeros(2),
              "optimizer": None, "model": torch.nn.Linear(1, 1)}, tmp_path / "x.pt")
    info = inspect(p)
    assert info.step is None and info.epoch is None
    assert info.metrics == {}
    assert info.has_optimizer is False
    assert info.state_dict_key is None  # a pickled module is not a state dict

    p = save({"global_step": torch.tensor(5), "step": 7, "iter_num": 9}, tmp_path / "y.pt")
    assert inspect(p).step == 7  # the first key, in order, that holds a plain int


def test_read_scalar_reads_small_tensors_of_every_common_dtype(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3
    values = {
        "bf16": torch.tensor(1.3, dtype=torch.bfloat16),
        "f16": torch.tensor(-2.7, dtype=torch.float16),
        "f32": torch.tensor(3.14159),
        "f64": torch.tensor(1e-300, dtype=torch.float64),
        "i64": torch.tensor(-(2**40)),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "b": torch.tensor([True, False]),
        "view": base[1:, ::2],                 # offset and strides into a bigger storage
        "bf16_vec": torch.tensor([0.1, -8.5, 1e30], dtype=torch.bfloat16),
        "c64": torch.tensor(1 + 2j, dtype=torch.complex64),
        "empty": torch.zeros(0, 5),
    }
    p = save(values, tmp_path / "t.pt")
    root, _ = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"], archive=prefix_of(p))
    with zipfile.ZipFile(p) as z:
        for name, t in values.items():
            got = read_scalar(z, root[name])
            want = t.flatten().tolist()
            assert got == (want[0] if t.numel() == 1 else want), name
        with pytest.raises(TorchZipError, match="16"):
            read_scalar(z, TensorRef(root["view"].storage, 0, (17,), (0,), "float32"))


def test_read_scalar_honours_a_big_endian_byteorder_record(tmp_path):
    t = torch.tensor([1.5, -2.25, 1e10], dtype=torch.float32)
    little = save({"t": t}, tmp_path / "le.pt")
    swapped = np.frombuffer(t.numpy().tobytes(), dtype="<f4").astype(">f4").tobytes()
    big = rezip(little, tmp_path / "be.pt", replace={"byteorder": b"big", "data/0": swapped})
    assert torch.load(big, weights_only=True)["t"].tolist() == t.tolist()  # torch agrees it is valid
    info = inspect(big)
    assert info.byteorder == "big"
    root, _ = parse_pickle(zip_entries(big)[f"{prefix_of(big)}/data.pkl"], archive=prefix_of(big))
    with zipfile.ZipFile(big) as z:
        assert read_scalar(z, root["t"]) == t.tolist()


def test_tensor_v3_storages_of_new_dtypes(tmp_path):
    p = save({"f8": torch.zeros(3, dtype=torch.float8_e4m3fn), "u16": torch.tensor([7, 9], dtype=torch.uint16)},
             tmp_path / "v3.pt")
    assert check(p, verify_crc=True) is None
    root, storages = parse_pickle(zip_entries(p)[f"{prefix_of(p)}/data.pkl"], archive=prefix_of(p))
    assert root["u16"].dtype == "uint16" and root["u16"].storage.dtype == "uint8"  # untyped: bytes
    with zipfile.ZipFile(p) as z:
        assert read_scalar(z, root["u16"]) == [7, 9]
        with pytest.raises(TorchZipError):
            read_scalar(z, root["f8"])


def test_inspect_reads_only_data_pkl_of_a_big_file(tmp_path):
    p = save({"w": torch.ones(8 * 1024 * 1024), "step": 3, "loss": torch.tensor(0.25)}, tmp_path / "big.pt")
    t0 = time.perf_counter()
    info = inspect(p)
    assert time.perf_counter() - t0 < 1.0  # ~1 ms: 32 MB of storage is not read
    assert (info.step, info.metrics, info.storage_bytes) == (3, {"loss": 0.25}, 32 * 1024 * 1024 + 4)
    start, end = data_ranges(p.read_bytes())[f"{prefix_of(p)}/data/0"]
    flip(p, end - 1)
    assert check(p) is None  # structure intact, and the storage is not read without verify_crc
    assert check(p, verify_crc=True) == "CRC of data/0 fails"
    assert tz.find_problem(p, verify_crc=True).kind is Kind.CORRUPT


def test_zip64_and_classic_end_records(tmp_path):
    src = save({"w": torch.arange(4.0), "step": 9}, tmp_path / "src.pt")
    raw = src.read_bytes()
    # torch writes zip64 end records (record + locator before the classic end record) even for tiny files
    eocd, rec = raw.rfind(b"PK\x05\x06"), raw.rfind(b"PK\x06\x06")
    assert rec == eocd - 76 and raw.rfind(b"PK\x06\x07") == eocd - 20
    assert check(src, verify_crc=True) is None

    classic = tmp_path / "classic.pt"  # what other zip writers (and a rewrite by zipfile) produce
    classic.write_bytes(raw[:rec] + raw[eocd:])
    assert torch.load(classic, weights_only=True)["w"].tolist() == [0, 1, 2, 3]
    assert check(classic, verify_crc=True) is None
    assert inspect(classic).step == 9

    n = len(zip_entries(src))
    assert check(src, limits=Limits(max_entries=3)) == f"the archive has {n} entries, more than the limit of 3"

    bad = bytearray(raw)
    bad[rec] ^= 1
    (tmp_path / "sig.pt").write_bytes(bytes(bad))
    assert check(tmp_path / "sig.pt") == "the zip64 end of central directory is damaged"
    for field_at in (40, 48):  # the central directory's size, then its offset, in the zip64 record
        bad = bytearray(raw)
        struct.pack_into("<Q", bad, rec + field_at, struct.unpack_from("<Q", bad, rec + field_at)[0] - 1)
        (tmp_path / "off.pt").write_bytes(bytes(bad))
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "off.pt", weights_only=True)
        assert assert_reason_or_error(tmp_path / "off.pt") == \
            "the zip central directory is damaged (its offset and size disagree)"


# ------------------------------------------------------------------------------------------------
# Lightning


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    pl = pytest.importorskip("lightning.pytorch",
                             reason="lightning is not installed (.venv/bin/pip install -c constraints.txt lightning)")
    from torch.utils.data import DataLoader, TensorDataset

    class TwoLayer(pl.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = x.sum(1, keepdim=True)
    root = tmp_path_factory.mktemp("lightning")
    cb = pl.callbacks.ModelCheckpoint(monitor="val_loss", save_top_k=2, dirpath=root / "ckpt", save_last=True)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], enable_progress_bar=False, logger=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         default_root_dir=root)
    trainer.fit(TwoLayer(), DataLoader(TensorDataset(x, y), batch_size=8),
                DataLoader(TensorDataset(x, y), batch_size=16))
    return cb, trainer


def test_lightning_ckpt_best_model_path_and_score_match_the_callback(lightning_run):
    cb, trainer = lightning_run
    info = inspect(cb.best_model_path, verify_crc=True)
    assert info.kind == "lightning"
    m = re.search(r"epoch=(\d+)-step=(\d+)", Path(cb.best_model_path).name)
    assert (info.epoch, info.step) == (int(m.group(1)), int(m.group(2)))
    assert info.has_optimizer and info.state_dict_key == "state_dict"
    assert info.lightning.version == __import__("lightning").__version__
    (mc,) = info.lightning.model_checkpoints
    assert (mc.monitor, mc.mode) == ("val_loss", "min")
    assert mc.best_model_path == cb.best_model_path
    assert mc.best_model_score == cb.best_model_score.item()
    assert info.metrics["val_loss"] == cb.best_model_score.item()

    last = inspect(cb.last_model_path)
    assert last.step == trainer.global_step == 12
    (mc,) = last.lightning.model_checkpoints
    assert mc.best_model_path == cb.best_model_path
    assert mc.best_model_score == cb.best_model_score.item()
    assert mc.best_k_models == {k: v.item() for k, v in cb.best_k_models.items()}
    assert mc.kth_best_model_path == cb.kth_best_model_path


def test_lightning_ckpt_fields_equal_what_torch_load_reads(lightning_run):
    cb, _ = lightning_run
    files = sorted(Path(cb.dirpath).glob("*.ckpt"))
    assert len(files) == 3  # top 2 and last
    for f in files:
        ref = torch.load(f, weights_only=False)
        info = inspect(f)
        assert (info.step, info.epoch) == (ref["global_step"], ref["epoch"])
        assert info.n_tensors == count_tensors(ref)
        ((key, state),) = [(k, v) for k, v in ref["callbacks"].items() if k.startswith("ModelCheckpoint")]
        (mc,) = info.lightning.model_checkpoints
        assert mc.key == key
        assert mc.best_model_path == state["best_model_path"]
        assert mc.best_model_score == state["best_model_score"].item()
        assert mc.current_score == state["current_score"].item()
        assert mc.kth_value == state["kth_value"].item()
        assert mc.last_model_path == state["last_model_path"]
        assert mc.dirpath == state["dirpath"]
        assert mc.best_k_models == {k: v.item() for k, v in state["best_k_models"].items()}


# ------------------------------------------------------------------------------------------------
# Damage


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small real checkpoint (model, AdamW state, step, loss tensor) and its entries' data ranges."""
    d = tmp_path_factory.mktemp("sample")
    model = torch.nn.Linear(4, 3)
    opt = adamw_after_one_step(model)
    p = save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 7,
              "best_val_loss": torch.tensor(2.5)}, d / "sample.pt")
    raw = p.read_bytes()
    return raw, data_ranges(raw), d


def test_truncation_is_detected_at_every_cut(sample, tmp_path):
    raw, _, _ = sample
    p = tmp_path / "cut.pt"
    for cut in sorted(set(range(0, len(raw), 97)) | set(range(len(raw) - 30, len(raw)))):
        p.write_bytes(raw[:cut])
        reason = assert_reason_or_error(p)
        assert reason in ("empty file", "truncated (no zip central directory)"), (cut, reason)


def test_a_flipped_byte_in_data_pkl_or_a_storage_is_detected(sample, tmp_path):
    raw, ranges, _ = sample
    p = tmp_path / "f.pt"
    pre = next(iter(ranges)).split("/")[0]
    start, end = ranges[f"{pre}/data.pkl"]
    for pos in range(start, end, 13):
        p.write_bytes(raw)
        flip(p, pos)
        assert isinstance(check(p), str)  # data.pkl is always read whole, so its CRC is always checked
    start, end = ranges[f"{pre}/data/0"]
    p.write_bytes(raw)
    flip(p, start + 1)
    assert check(p) is None
    assert check(p, verify_crc=True) == "CRC of data/0 fails"
    with pytest.raises(TorchZipError, match="CRC of data/0 fails"):
        inspect(p, verify_crc=True)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_truncation_or_byte_flip_gives_a_reason_never_another_exception(sample, data):
    raw, ranges, d = sample
    truncate = data.draw(st.booleans(), label="truncate")
    if truncate:
        bad = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
        pos = None
    else:
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        bad = bytearray(raw)
        bad[pos] ^= data.draw(st.integers(1, 255), label="mask")
        bad = bytes(bad)
    p = d / "hyp.pt"
    p.write_bytes(bad)

    quick, full = check(p), check(p, verify_crc=True)
    assert quick is None or isinstance(quick, str)
    assert full is None or isinstance(full, str)
    try:
        info = inspect(p, verify_crc=True)
    except TorchZipError:
        info = None
    else:
        assert isinstance(info, TorchFileInfo)
    if truncate:
        assert isinstance(quick, str) and isinstance(full, str)
    elif any(start <= pos < end for start, end in ranges.values()):
        assert isinstance(full, str), pos  # CRC-32 catches every single-byte change of entry data
    assert (full is None) == (info is not None)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_edit_of_data_pkl_behind_a_valid_crc_gives_a_reason_or_info(sample, data):
    """The CRC stops a damaged data.pkl before it is parsed; here the CRC is made to match, so the
    parser itself meets the damage."""
    raw, _, d = sample
    src = d / "sample.pt"
    pkl_name = next(n for n in zip_entries(src) if n.endswith("/data.pkl"))
    pkl = bytearray(zip_entries(src)[pkl_name])
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        pos = data.draw(st.integers(0, len(pkl) - 1), label="pos")
        kind = data.draw(st.sampled_from(["set", "delete", "insert"]), label="kind")
        chunk = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        if kind == "set":
            pkl[pos:pos + len(chunk)] = chunk
        elif kind == "delete":
            del pkl[pos:pos + len(chunk)]
        else:
            pkl[pos:pos] = chunk
    p = rezip(src, d / "edited.pt", replace={"data.pkl": bytes(pkl)})
    reason = check(p, verify_crc=True)
    assert reason is None or isinstance(reason, str)
    try:
        info = inspect(p)
    except TorchZipError:
        info = None
    assert (reason is None) == (info is not None)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=200))
def test_parse_pickle_of_any_bytes_raises_only_torchziperror(body):
    for payload in (body, b"\x80\x02" + body, b"\x80\x02}(" + body + b"u."):
        try:
            parse_pickle(payload)
        except TorchZipError:
            pass


def test_storage_problems(tmp_path):
    src = save({"w": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "src.pt")
    assert assert_reason_or_error(rezip(src, tmp_path / "a.pt", drop=("data/1",))) == "storage data/1 is missing"
    short = rezip(src, tmp_path / "b.pt", replace={"data/0": b"\x00" * 8})
    assert assert_reason_or_error(short) == "storage data/0 is truncated: it needs 12 bytes and holds 8"

    huge = archive(tmp_path / "huge.pt", torch_like_pickle({"w": FakeTensor(FakeStorage("0", 2**40), 0, (4,), (1,))}),
                   {"0": b"\x00" * 16})
    assert assert_reason_or_error(huge) == \
        f"storage data/0 is truncated: it needs {4 * 2**40} bytes and holds 16"
    past = archive(tmp_path / "past.pt", torch_like_pickle({"w": FakeTensor(FakeStorage("0", 4), 2, (3,), (1,))}),
                   {"0": b"\x00" * 16})
    assert "extends past the end of storage data/0" in assert_reason_or_error(past)
    ok = archive(tmp_path / "ok.pt", torch_like_pickle({"w": FakeTensor(FakeStorage("0", 4), 1, (3,), (1,))}),
                 {"0": struct.pack("<4f", 0, 1, 2, 3)})
    assert torch.load(ok, weights_only=True)["w"].tolist() == [1, 2, 3]  # the fake shape is torch's shape
    assert check(ok, verify_crc=True) is None
    assert inspect(ok).n_tensors == 1


def test_archive_level_problems(tmp_path):
    src = save({"w": torch.ones(3)}, tmp_path / "src.pt")
    assert assert_reason_or_error(rezip(src, tmp_path / "v.pt", drop=("version",))) == \
        "the version record is missing (torch.load refuses such a file)"
    assert "compressed" in assert_reason_or_error(rezip(src, tmp_path / "c.pt", compress=True))
    assert assert_reason_or_error(rezip(src, tmp_path / "o.pt", replace={"byteorder": b"middle"})) == \
        "the byteorder record is neither 'little' nor 'big'"
    assert assert_reason_or_error(rezip(src, tmp_path / "n.pt", drop=("data.pkl",))) == \
        "not a torch.save file (no data.pkl)"

    (tmp_path / "empty.pt").write_bytes(b"")
    assert assert_reason_or_error(tmp_path / "empty.pt") == "empty file"
    (tmp_path / "text.pt").write_text("hello")
    assert "not a torch.save file" in assert_reason_or_error(tmp_path / "text.pt")
    assert "cannot read the file" in check(tmp_path / "missing.pt")
    assert check(tmp_path) == "not a regular file"
    fifo = tmp_path / "model_step_500.pt"
    os.mkfifo(fifo)  # a planted FIFO must not hang the daemon in open()
    assert check(fifo) == "not a regular file"
    with pytest.raises(TorchZipError, match="not a regular file"):
        inspect(fifo)

    # Data appended after the end record: zipfile alone would quietly accept it.
    (tmp_path / "tail.pt").write_bytes(src.read_bytes() + b"junk")
    assert assert_reason_or_error(tmp_path / "tail.pt") == "truncated (no zip central directory)"


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_files_are_read_and_their_whole_structure_checked(tmp_path, protocol):
    p = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.int64)}, "step": 40,
                "loss": torch.tensor(0.25), "optimizer": {"state": {}, "param_groups": []}}, p,
               _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert check(p, verify_crc=True) is None
    info = inspect(p)
    assert (info.format, info.step, info.metrics, info.has_optimizer, info.state_dict_key, info.n_storages) == \
        ("legacy", 40, {"loss": 0.25}, True, "model", 3)
    assert info.storage_bytes == 6 * 4 + 3 * 8 + 4
    raw = p.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in range(1, len(raw)):  # a file cut anywhere is never complete
        cut.write_bytes(raw[:n])
        assert check(cut) is not None, n
        with pytest.raises(TorchZipError):
            inspect(cut)
    cut.write_bytes(raw[:-1])
    m = re.fullmatch(r"storage [0-9]+ is truncated: it needs ([0-9]+) bytes and holds ([0-9]+)", check(cut))
    assert m and int(m.group(2)) == int(m.group(1)) - 1
    (tmp_path / "pad.pt").write_bytes(raw + b"\0" * 8)
    assert check(tmp_path / "pad.pt") == "8 bytes follow its last storage (torch.save writes none: damaged or padded)"
    # a storage's element count that is not what the pickle says
    first_count = raw.index(struct.pack("<q", 6))
    bad = bytearray(raw)
    bad[first_count] = 7
    (tmp_path / "count.pt").write_bytes(bytes(bad))
    assert "holds 7 elements, its pickle says 6" in check(tmp_path / "count.pt")
    # a pickle that is not torch's
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"step": 1}, protocol=protocol))
    assert check(tmp_path / "plain.pt") == "not a torch.save file (a pickle without torch's magic number)"
    assert tz.find_problem(tmp_path / "plain.pt").kind is Kind.INVALID


def test_random_bytes(tmp_path):
    rng = random.Random(1)
    p = tmp_path / "r.pt"
    for i in range(60):
        head = [b"", b"PK\x03\x04", b"\x80\x02", b"PK\x03\x04" + b"\x00" * 26][i % 4]
        p.write_bytes(head + bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 50, 5000]))))
        reason = check(p, verify_crc=True)
        assert isinstance(reason, str)
        info_or_error = None
        try:
            info_or_error = inspect(p)
        except TorchZipError:
            pass
        assert info_or_error is None or info_or_error.kind == "legacy"


# ------------------------------------------------------------------------------------------------
# Hostile files


class Call:
    """Pickles as `fn(*args)`: GLOBAL fn + REDUCE, exactly what a malicious checkpoint carries."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, *args):  # pickle wants the first item of a reduce tuple to be callable
        raise AssertionError("never called")

    def __reduce__(self):
        return (self.fn, self.args)


def evil_payloads(marker: Path):
    import os
    import subprocess as sp
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "builtins.eval": Call(eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": Call(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": Call(sp.Popen, ["touch", str(marker)]),
        "getattr chain": Call(Call(getattr, Call(__import__, "os"), "system"), f"touch {marker}"),
    }


@pytest.mark.parametrize("which", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "getattr chain"])
def test_code_in_a_checkpoint_never_runs(tmp_path, which):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"iter_num": 3, "x": evil_payloads(marker)[which]}, protocol=2)
    if which == "builtins.exec":  # the payload is live: plain pickle runs it
        pickle.loads(payload)
        assert marker.exists()
        marker.unlink()
    src = save({"w": torch.ones(2)}, tmp_path / "src.pt")
    p = rezip(src, tmp_path / "evil.pt", replace={"data.pkl": payload})
    assert check(p, verify_crc=True) is None  # a structurally fine file: only placeholders inside
    info = inspect(p)
    assert info.step == 3
    root, _ = parse_pickle(payload)
    assert isinstance(root["x"], Unknown)
    assert not marker.exists()


def test_find_class_never_imports(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "tz_trap_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef boom(*a):\n    open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = b"\x80\x02}X\x01\x00\x00\x00xctz_trap_module\nboom\n)Rs."
    root, _ = parse_pickle(payload)
    assert isinstance(root["x"], Unknown)
    assert (root["x"].module, root["x"].name, root["x"].args) == ("tz_trap_module", "boom", ())
    assert "tz_trap_module" not in sys.modules
    assert not marker.exists()


def test_build_cannot_change_our_stubs_or_validated_tensors(tmp_path):
    defaults = tzu._rebuild_tensor_v2.__defaults__
    rebuild_stub = b"ctorch._utils\n_rebuild_tensor_v2\n"
    for target in (rebuild_stub, b"ctorch\nfloat32\n", b"ctorch\nFloatStorage\n"):
        payload = b"\x80\x02" + target + b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
        with pytest.raises(TorchZipError):
            parse_pickle(payload)
    assert tzu._rebuild_tensor_v2.__defaults__ == defaults
    # BUILD on a tensor that passed its bounds check, to give it another shape afterwards
    good = torch_like_pickle(FakeTensor(FakeStorage("0", 4), 0, (4,), (1,)))
    payload = good[:-1] + b"N}X\x05\x00\x00\x00shapeK\x64\x85s\x86b."
    with pytest.raises(TorchZipError):
        parse_pickle(payload)


@pytest.mark.slow
def test_deeply_nested_list_is_refused_not_a_recursion_error(tmp_path):
    n = 100_000
    payload = b"\x80\x02" + b"(" * n + b"]" + b"l" * n + b"."
    p = archive(tmp_path / "deep.pt", payload)
    assert assert_reason_or_error(p) == "data.pkl nests objects deeper than 128 levels"
    dict_payload = b"\x80\x02" + b"}(X\x01\x00\x00\x00a" * n + b"}" + b"u" * n + b"."
    assert "deeper than" in assert_reason_or_error(archive(tmp_path / "deepd.pt", dict_payload))


def test_deeply_nested_tuple_key_cannot_crash_the_process(tmp_path):
    # Plain pickle.loads of this crashes CPython (hashing the key overflows the C stack): run it in a
    # child so a regression shows as a failed test, not a dead test run.
    p = archive(tmp_path / "tuple.pt", b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.")
    code = ("import sys; from ckpt_daemon.store.torchzip import check; print(check(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(p)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "data.pkl nests tuples deeper than 128 levels"


def test_memo_index_bomb_is_refused_before_allocating(tmp_path):
    # LONG_BINPUT 0x7ffffff0: the C unpickler would grow its memo array to 2**32 pointers (32 GiB).
    p = archive(tmp_path / "memo.pt", b"\x80\x02]r\xf0\xff\xff\x7f.")
    t0 = time.perf_counter()
    assert "memo index 2147483632" in assert_reason_or_error(p)
    assert time.perf_counter() - t0 < 5


def test_unsafe_entry_names(tmp_path):
    src = save({"w": torch.ones(2)}, tmp_path / "src.pt")
    entries = zip_entries(src)
    pre = prefix_of(src)
    for bad, why in (("../evil", "contains '..'"), (f"{pre}/data/../../x", "contains '..'"),
                     ("/etc/cron.d/x", "is an absolute path"), ("C:/x", "is an absolute path")):
        p = write_zip(tmp_path / "bad.pt", {**entries, bad: b"x"})
        assert why in assert_reason_or_error(p), bad
    # a NUL inside a name (zipfile cuts names at NUL; the raw name still has it)
    p = write_zip(tmp_path / "nul.pt", {**entries, f"{pre}/zzzz": b"x"})
    raw = p.read_bytes().replace(f"{pre}/zzzz".encode(), f"{pre}/z\x00zz".encode())
    p.write_bytes(raw)
    assert "NUL" in assert_reason_or_error(p)
    p = write_zip(tmp_path / "dup.pt", entries)
    with zipfile.ZipFile(p, "a") as z, pytest.warns(UserWarning):
        z.writestr(f"{pre}/data/0", b"\x00" * 8)
    assert "appears twice" in assert_reason_or_error(p)


def test_limits_are_enforced(tmp_path):
    p = save({"hist": [float(i) for i in range(5000)], "step": 1}, tmp_path / "h.pt")
    assert check(p) is None
    assert "larger than 100 bytes" in str(pytest.raises(TorchZipError, inspect, p, max_pickle_bytes=100).value)
    assert check(p, limits=Limits(max_pickle_ops=1000)) == "data.pkl has more than 1000 opcodes"
    assert check(p, limits=Limits(max_nodes=1000)) == "data.pkl holds more than 1000 objects"
    nested = save({"a": {"b": {"c": {"d": 1}}}}, tmp_path / "n.pt")
    assert check(nested, limits=Limits(max_depth=3)) == "data.pkl nests objects deeper than 3 levels"
    assert check(nested, limits=Limits(max_depth=5)) is None
    many = b"\x80\x02(" + b"".join(b"cm%d\nx\n" % i for i in range(50)) + b"l."
    assert "more than 10 globals" in check(archive(tmp_path / "g.pt", many), limits=Limits(max_globals=10))


def test_the_module_imports_neither_torch_nor_numpy(tmp_path):
    p = save({"w": torch.ones(2), "rng": np.random.get_state()}, tmp_path / "x.pt")
    code = ("import sys; from ckpt_daemon.store import torchzip as t; i = t.inspect(sys.argv[1]); "
            "assert t.check(sys.argv[1], verify_crc=True) is None; "
            "print(i.n_tensors, 'torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(p)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False"]


def check_in_a_process(path: Path) -> dict:
    """torchzip.check run in a fresh process: its reason, its CPU seconds and its peak RSS."""
    # VmHWM, not ru_maxrss: the latter keeps the peak of the forking test process across exec
    code = ("import json, re, sys, time; from ckpt_daemon.store import torchzip as t; "
            "c = time.process_time(); r = t.check(sys.argv[1], verify_crc=True); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'reason': r, 'cpu': time.process_time() - c, 'rss_mb': hwm / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_zip_of_a_million_empty_entries_is_refused_at_the_cost_of_a_real_checkpoint(tmp_path):
    real = check_in_a_process(save({"model": tiny_gpt().state_dict(), "step": 7}, tmp_path / "real.pt"))
    assert real["reason"] is None
    hostile = [
        empty_entries_zip(tmp_path / "million.pt", 999_990),  # just under what the parser once allowed
        empty_entries_zip(tmp_path / "liar.pt", 999_990, declare=9),  # its end record says 9 entries
        empty_entries_zip(tmp_path / "unnamed.pt", 240_000),  # within the entry bound, but data.pkl names none
    ]
    for p in hostile:
        r = check_in_a_process(p)
        assert r["reason"] and ("entries" in r["reason"] or "central directory" in r["reason"]), (p.name, r)
        # no more memory and about the time a real checkpoint's check takes (both measured in this run)
        assert r["rss_mb"] < real["rss_mb"] + 32, (p.name, r, real)
        assert r["cpu"] < real["cpu"] + 3, (p.name, r, real)
    with pytest.raises(tz.TorchZipLimitError):
        inspect(tmp_path / "million.pt")


def test_a_check_that_uses_up_its_cpu_time_is_a_timeout_not_damage(tmp_path):
    from ckpt_daemon.store import foreign

    p = save({"hist": [float(i) for i in range(200_000)], "step": 1}, tmp_path / "model_step_1.pt")
    assert check(p) is None
    assert "took more than 0.001 CPU seconds" in check(p, limits=Limits(max_cpu_s=0.001))
    assert tz.find_problem(p, limits=Limits(max_cpu_s=0.001)).kind is Kind.UNREADABLE
    with pytest.raises(tz.TorchZipTimeout):
        inspect(p, limits=Limits(max_cpu_s=0.001))
    # the catalog reports such a file as unreadable (never used, never set aside as damaged)
    import unittest.mock

    with unittest.mock.patch.object(tz.extract, "_DEFAULT_LIMITS", Limits(max_cpu_s=0.001)):
        status, reason, _ = foreign.describe_file(p, verify=False)
    assert status == "unreadable" and "CPU seconds" in reason
