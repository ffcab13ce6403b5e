"""Where the built-in trainer computes, decided as a pure function of what the machine has (so every GPU
decision is checked here, on a CPU); the device record of the heartbeat as the daemon shows it; the
pinned/host-memory and verified device-load machinery of ckpt_daemon/devio.py, run on the CPU."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from ckpt_daemon import device as dv
from ckpt_daemon import devio
from ckpt_daemon.errors import EXIT_USAGE
from ckpt_daemon.fsutil import new_hasher
from ckpt_daemon.store import safetensors_file as stfile
from tests.helpers import resident_bytes

NO_GPU = dv.Present(cuda=False, gpus=0, bf16=False, cpu_fp16_scaler=True)
FOUR_H200 = dv.Present(cuda=True, gpus=4, bf16=True, cpu_fp16_scaler=True)


# ------------------------------------------------------------------------------------ device and backend
@pytest.mark.parametrize("device, present, job, want_device, want_backend", [
    ("auto", NO_GPU, dv.Job(), "cpu", None),
    ("auto", FOUR_H200, dv.Job(), "cuda:0", None),
    ("cuda", FOUR_H200, dv.Job(), "cuda:0", None),
    ("cpu", FOUR_H200, dv.Job(), "cpu", None),
    # torchrun: rank i of a node binds cuda:LOCAL_RANK and talks NCCL; on CPUs gloo
    ("auto", FOUR_H200, dv.Job(rank=6, world=8, local_rank=2, local_world=4), "cuda:2", "nccl"),
    ("auto", NO_GPU, dv.Job(rank=1, world=2, local_rank=1, local_world=2), "cpu", "gloo"),
    ("cpu", FOUR_H200, dv.Job(rank=1, world=2, local_rank=1, local_world=2), "cpu", "gloo"),
    ("auto", dv.Present(cuda=True, gpus=0), dv.Job(), "cpu", None),  # CUDA built in, no device visible
], ids=["auto-cpu", "auto-gpu", "cuda", "cpu-on-gpu-box", "torchrun-gpu", "torchrun-cpu", "torchrun-cpu-forced",
        "no-visible-gpu"])
def test_device_and_backend_follow_what_is_present(device, present, job, want_device, want_backend):
    p = dv.place(device, "fp32", False, present, job)
    assert (p.device, p.backend) == (want_device, want_backend)
    assert p.autocast_dtype is None and not p.grad_scaler


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(dv.DeviceError, match=r"trainer.device is cuda, but torch sees no CUDA GPU.*trainer.device: auto"):
        dv.place("cuda", "fp32", False, NO_GPU)


@pytest.mark.parametrize("job", [dv.Job(rank=0, world=8, local_rank=0, local_world=8),
                                 dv.Job(rank=5, world=6, local_rank=5, local_world=6)])
def test_more_ranks_than_gpus_is_a_clear_error(job):
    with pytest.raises(dv.DeviceError, match=r"runs \d trainer processes but torch sees 4 GPU.*--nproc_per_node at most 4") as ei:
        dv.place("auto", "fp32", False, FOUR_H200, job)
    msg = str(ei.value)
    assert "\n" not in msg and "one GPU per process" in msg and "trainer.device: cpu" in msg  # one paragraph: cause, fix
    assert ei.value.exit_code == EXIT_USAGE
    # the same job on the CPU is fine: gloo, every rank on the CPU
    assert dv.place("cpu", "fp32", False, FOUR_H200, job).backend == "gloo"


def test_backend_is_nccl_on_gpus_and_gloo_on_cpus():
    assert (dv.backend_for("cuda"), dv.backend_for("cpu")) == ("nccl", "gloo")


@pytest.mark.slow  # a real process
def test_the_trainer_asked_for_cuda_without_a_gpu_exits_with_one_paragraph_naming_the_fix(tmp_path):
    from tests.helpers import env_for_children, run_py, write_config

    cfg = write_config(tmp_path, {"trainer": {"device": "cuda"}})
    env = {**env_for_children(), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, here or on a GPU machine
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "2"], env=env, timeout=120)
    assert r.returncode == EXIT_USAGE, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "trainer.device is cuda" in ln)
    assert "torch sees no CUDA GPU" in line and "Set trainer.device: auto" in line
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # nothing trained


@pytest.mark.parametrize("precision, dtype, scaler", [("fp32", None, False), ("bf16", "bfloat16", False),
                                                      ("fp16", "float16", True)])
def test_precision_gives_the_autocast_dtype_and_a_scaler_for_fp16_only(precision, dtype, scaler):
    for present in (NO_GPU, FOUR_H200):
        p = dv.place("auto", precision, True, present)
        assert (p.autocast_dtype, p.grad_scaler, p.deterministic) == (dtype, scaler, True)


def test_precisions_the_hardware_or_torch_cannot_do_are_refused():
    old_gpu = dv.Present(cuda=True, gpus=1, bf16=False)
    with pytest.raises(dv.DeviceError, match="does not support bfloat16"):
        dv.place("auto", "bf16", False, old_gpu)
    assert dv.place("auto", "fp16", False, old_gpu).grad_scaler  # fp16 with loss scaling works there
    old_torch = dv.Present(cuda=False, gpus=0, cpu_fp16_scaler=False)
    with pytest.raises(dv.DeviceError, match=r"GradScaler\('cpu'\).*Use bf16 or fp32"):
        dv.place("auto", "fp16", False, old_torch)
    with pytest.raises(dv.DeviceError, match="use fp32, bf16 or fp16"):
        dv.place("auto", "fp8", False, NO_GPU)
    with pytest.raises(dv.DeviceError, match="use auto, cpu or cuda"):
        dv.place("tpu", "fp32", False, NO_GPU)


def test_deterministic_kernels_set_the_cublas_workspace_on_gpus_only():
    gpu = dv.place("auto", "fp32", True, FOUR_H200)
    assert dv.deterministic_env({}, gpu) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert dv.deterministic_env({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, gpu) == {}  # the user's valid choice stays
    assert dv.deterministic_env({"CUBLAS_WORKSPACE_CONFIG": "junk"}, gpu) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert dv.deterministic_env({}, dv.place("auto", "fp32", True, NO_GPU)) == {}
    assert dv.deterministic_env({}, dv.place("auto", "fp32", False, FOUR_H200)) == {}


def test_job_comes_from_torchruns_environment_and_bad_values_are_errors():
    assert dv.job_from_env({}) == dv.Job(0, 1, 0, 1)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert dv.job_from_env(env) == dv.Job(5, 8, 1, 4)
    assert dv.job_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == dv.Job(1, 2, 1, 2)  # no LOCAL_*: one node
    for bad in ({"WORLD_SIZE": "two"}, {"RANK": "-1", "WORLD_SIZE": "2"}, {"RANK": "3", "WORLD_SIZE": "2"},
                {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}):
        with pytest.raises(dv.DeviceError, match="torchrun"):
            dv.job_from_env(bad)


def test_setup_on_this_machine_applies_the_decision():
    # This machine has no GPU: auto is the CPU; deterministic kernels are switched on for real.
    before = torch.are_deterministic_algorithms_enabled()
    try:
        p = devio.setup("auto", "bf16", True, dv.Job())
        assert p.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
        assert torch.are_deterministic_algorithms_enabled()
        with devio.autocast(p):
            y = torch.nn.Linear(4, 4).to(p.device)(torch.randn(2, 4, device=p.device))
        assert y.dtype == torch.bfloat16
        assert devio.grad_scaler(p) is None
        fp16 = dv.place(p.device_type, "fp16", False, devio.present())
        assert devio.grad_scaler(fp16) is not None
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------------------------ the heartbeat's record
def test_the_device_record_is_checked_before_it_is_shown():
    good = {"device": "cuda:0", "name": "NVIDIA H200", "precision": "bf16", "deterministic": True,
            "memory": {"allocated": 12 << 30, "reserved": 14 << 30, "total": 139 << 30}}
    assert dv.heartbeat_device(good) == good
    line = dv.describe(good)
    assert line == "cuda:0 (NVIDIA H200), bf16, deterministic, memory 12.0 GiB allocated / 14.0 GiB reserved / 139.0 GiB total"
    hostile = {"device": "cuda:0\x1b[2J", "name": "x" * 10_000, "precision": ["bf16"], "deterministic": "yes",
               "memory": {"allocated": -5, "reserved": float("inf"), "total": True, "rss": "1", "other": 3}}
    got = dv.heartbeat_device(hostile)
    assert got == {"device": "cuda:0[2J", "name": "x" * dv.MAX_NAME}
    for junk in (None, "cuda", 3, [], {"name": "no device"}, {"device": ""}, {"device": 7}):
        assert dv.heartbeat_device(junk) is None
    assert dv.describe(None) == ""


def test_status_and_metrics_show_the_device_the_trainer_reports():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.metrics import DaemonCollector
    from daemon.statusview import render

    dev = {"device": "cuda:1", "name": "NVIDIA H200", "precision": "bf16",
           "memory": {"allocated": 3 << 30, "reserved": 4 << 30, "total": 139 << 30}}
    status = {"daemon": {"pid": 1, "started": 0}, "training": {"state": "running", "pid": 2, "step": 5, "device": dev},
              "checkpoints": {}}
    lines = [line for _, line in render(status, True, 10.0)]
    assert "device:   cuda:1 (NVIDIA H200), bf16, memory 3.0 GiB allocated / 4.0 GiB reserved / 139.0 GiB total" in lines
    reg = CollectorRegistry()
    reg.register(DaemonCollector(lambda: status, lambda: None))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert samples[("ckpt_daemon_training_device_info", (("device", "cuda:1"), ("name", "NVIDIA H200"),
                                                         ("precision", "bf16")))] == 1
    assert samples[("ckpt_daemon_training_device_memory_bytes", (("kind", "allocated"),))] == 3 << 30
    assert samples[("ckpt_daemon_training_device_memory_bytes", (("kind", "total"),))] == 139 << 30
    # a damaged record in a state file is neither shown nor exported, and breaks nothing
    status["training"]["device"] = {"device": ["x"], "memory": "lots"}
    assert not any(line.startswith("device:") for _, line in render(status, True, 10.0))
    assert "device_info" not in generate_latest(reg).decode()


# ------------------------------------------------------------------------ host memory for device copies
def test_reserved_slots_have_their_pages_mapped_before_the_first_save(tmp_path):
    from ckpt_daemon.checkpoint import CheckpointManager

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # no state yet: created at its first step
    mgr = CheckpointManager(tmp_path / "ck", memory=tmp_path / "region")
    assert mgr.reserve_memory(model=m, optimizer=opt)
    slots = mgr._memory.slots
    sizes = [s.size for s in slots]
    for s in slots:  # every page of both slots is mapped now: no page fault inside a save's copy
        assert s.host.how in ("populate", "touch")
        assert resident_bytes(devio.address_of(s.mm)) >= s.size - 4096
    # the estimate held: the first saves (the optimizer's state now exists) fit without growing the slots
    m(torch.randn(2, 512)).sum().backward()
    opt.step()
    for step in (1, 2):
        assert mgr.save(step, model=m, optimizer=opt, memory=True)
        mgr.wait()
    assert [s.size for s in mgr._memory.slots] == sizes
    mgr.close()


def test_the_state_estimate_matches_what_a_checkpoint_holds():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.Linear(32, 100, bias=False))
    m[1].weight = m[0].weight  # tied: stored once
    for opt_cls, kw in ((torch.optim.AdamW, {}), (torch.optim.Adam, {"amsgrad": True}), (torch.optim.SGD, {"momentum": 0.9})):
        opt = opt_cls(m.parameters(), lr=1e-3, **kw)
        before = devio.estimate_state_bytes(m, opt)
        m(torch.tensor([[1, 2]])).sum().backward()
        opt.step()
        actual = sum(t.numel() * t.element_size() for t in m.state_dict().values()) - 100 * 32 * 4
        actual += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        assert before == devio.estimate_state_bytes(m, opt) >= actual > 0.99 * before, opt_cls.__name__
        # a framework's wrapper (accelerate's .optimizer, Lightning's ._optimizer) and a list of them count the same
        wrapped = type("Wrapped", (), {"optimizer": opt})()
        assert devio.estimate_state_bytes(m, wrapped) == devio.estimate_state_bytes(m, [opt]) == before
        opt.zero_grad()


def test_a_reservation_that_cannot_fit_fails_at_the_first_save_with_the_regions_message(tmp_path):
    from ckpt_daemon import memory as mem
    from ckpt_daemon.checkpoint import CheckpointManager

    m = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(m.parameters())
    mgr = CheckpointManager(tmp_path / "ck", memory=tmp_path / "region", memory_max_bytes=1 << 20)
    mgr.reserve_memory(model=m, optimizer=opt, background=True)  # training would go on meanwhile
    with pytest.raises(mem.MemoryCheckpointError, match="max_gb"):
        mgr.save(1, model=m, optimizer=opt, memory=True)
    mgr.close()


def test_populate_falls_back_to_touching_where_the_kernel_lacks_it(tmp_path, monkeypatch):
    import mmap


    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 8 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[100:104] = b"abcd"
        monkeypatch.setattr(stfile, "_libc_madvise", lambda: None)
        assert devio.populate(mm) == "touch"
        assert mm[100:104] == b"abcd"  # nothing written
        assert resident_bytes(devio.address_of(mm)) >= (8 << 20) - 4096
        monkeypatch.undo()
        assert devio.populate(mm) in ("populate", "touch") and mm[100:104] == b"abcd"
        h = devio.HostMapping(mm, len(mm))
        if not torch.cuda.is_available():
            assert not h.pin()  # nothing to register with: copies stay as they were
        h.release()
        mm.close()
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- verified device load
def _files(tmp_path, sizes):
    rng = np.random.default_rng(0)
    jobs, data = [], {}
    for i, n in enumerate(sizes):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        p = tmp_path / f"f{i}"
        p.write_bytes(b)
        h = new_hasher("blake3")
        h.update(b)
        data[p.name] = b
        jobs.append(devio.ReadJob(p.name, str(p), n, "blake3", h.hexdigest()))
    return jobs, data


def test_the_piecewise_device_load_returns_every_byte_and_checks_every_digest(tmp_path):
    sizes = [0, 1, 4095, 3 * 65536 + 17, 65536 * 5, 1 << 20]
    jobs, data = _files(tmp_path, sizes)
    out = devio.read_to_device(jobs, "cpu", piece=65536, lanes=3)  # many pieces per file, three files in flight
    assert {k: v.numpy().tobytes() for k, v in out.items()} == data
    # sources may be open descriptors and mapped buffers too
    fd = os.open(tmp_path / "f3", os.O_RDONLY)
    try:
        arr = np.frombuffer(data["f4"], dtype=np.uint8)
        j = [devio.ReadJob("a", fd, sizes[3], jobs[3].algo, jobs[3].digest),
             devio.ReadJob("b", arr, sizes[4], jobs[4].algo, jobs[4].digest)]
        got = devio.read_to_device(j, torch.device("cpu"), piece=4096)
        assert got["a"].numpy().tobytes() == data["f3"] and got["b"].numpy().tobytes() == data["f4"]
    finally:
        os.close(fd)


def test_a_flipped_byte_or_a_short_file_fails_the_device_load_naming_the_file(tmp_path):
    jobs, data = _files(tmp_path, [300_000, 200_000, 100_000])
    raw = bytearray(data["f1"])
    raw[150_001] ^= 1
    (tmp_path / "f1").write_bytes(bytes(raw))
    with pytest.raises(devio.ReadError, match=r"f1 fails its blake3 checksum"):
        devio.read_to_device(jobs, "cpu", piece=65536)
    with pytest.raises(stfile.ChecksumMismatch):  # what read_checkpoint turns into "is corrupt"
        devio.read_to_device(jobs, "cpu", piece=65536)
    (tmp_path / "f1").write_bytes(data["f1"][:123_456])
    with pytest.raises(devio.ReadError, match=r"f1 could not be read: it ended at 123456 bytes"):
        devio.read_to_device(jobs, "cpu", piece=65536)
    # not hashed when verified moments ago (verify once): the flipped byte then goes through, as on the CPU path
    (tmp_path / "f1").write_bytes(bytes(raw))
    trusted = [devio.ReadJob(j.name, j.source, j.size) for j in jobs]
    assert devio.read_to_device(trusted, "cpu")["f1"].numpy().tobytes() == bytes(raw)


def test_parse_safetensors_on_a_loaded_buffer_matches_the_host_parse(tmp_path):
    tensors = {"odd": torch.arange(7, dtype=torch.uint8), "w": torch.randn(3, 5), "h": torch.randn(4).half(),
               "step": torch.tensor(3.0), "empty": torch.empty(0, 4)}
    with open(tmp_path / "x.safetensors", "wb") as fh:
        stfile.write_safetensors(fh, tensors, {"k": "v"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    host, meta = stfile.parse_safetensors(bytearray(raw))
    dev, meta2 = stfile.parse_safetensors(torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone())
    assert meta == meta2 == {"k": "v"} and list(host) == list(dev)
    for k in tensors:  # "w" follows 7 bytes: not 4-aligned in the buffer, copied to an aligned one
        assert dev[k].dtype == tensors[k].dtype and torch.equal(dev[k], tensors[k]), k


def test_read_checkpoint_through_the_device_path_gives_the_same_state_and_catches_damage(tmp_path, monkeypatch):
    from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
    from ckpt_daemon.errors import CheckpointError
    from tests.helpers import make_state, same_nested

    m, opt, sched = make_state(width=256)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, model=m, optimizer=opt, scheduler=sched, scaler=scaler, data_state={"pos": 9})
    host = read_checkpoint(path)
    # On this CPU machine the GPU branch runs with the CPU as its "device": the same pipeline and placement.
    monkeypatch.setattr(devio, "is_gpu", lambda loc: True)
    calls = []
    real = devio.read_files
    monkeypatch.setattr(devio, "read_files", lambda *a, **k: calls.append(a[1]) or real(*a[:4], "cpu"))
    dev = read_checkpoint(path, map_location="cpu")
    assert sorted(calls[0]) == sorted(n for n in json.loads((path / "manifest.json").read_text())["files"]
                                      if n.endswith(".safetensors"))
    for k in ("model", "optimizer", "scheduler", "scaler", "data", "extra"):
        assert same_nested(host[k], dev[k]), k
    # RNG states come back as the CPU tensors and numpy arrays torch and numpy take
    assert dev["rng"]["torch"].device.type == "cpu" and torch.equal(dev["rng"]["torch"], host["rng"]["torch"])
    assert isinstance(dev["rng"]["numpy"][1], np.ndarray) and np.array_equal(dev["rng"]["numpy"][1], host["rng"]["numpy"][1])
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-3] ^= 0x10
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"is corrupt: model.safetensors fails its .* checksum"):
        read_checkpoint(path, map_location="cpu")


def test_only_the_optimizers_tensors_stay_on_the_device():
    assert not devio.keep_on_host("optimizer/state/0/exp_avg", torch.zeros(3))
    assert devio.keep_on_host("optimizer/state/0/step", torch.tensor(1.0))  # a fresh optimizer keeps it on the CPU
    for name in ("rng/torch", "rng/cuda/0", "scaler/scale", "extra/rng_ranks/0/torch", "data/x", "scheduler/y"):
        assert devio.keep_on_host(name, torch.zeros(3))
    assert not devio.is_gpu("cpu") and not devio.is_gpu(torch.device("cpu")) and devio.is_gpu("cuda:1")


def test_a_memory_slot_loads_through_the_device_path_and_a_damaged_one_is_refused(tmp_path, monkeypatch):
    from ckpt_daemon import memory as mem
    from ckpt_daemon.checkpoint import CheckpointManager
    from ckpt_daemon.memsave import read_slot_state
    from tests.helpers import make_state, same_nested

    m, opt, sched = make_state(width=256)
    region, ck = tmp_path / "region", tmp_path / "ck"
    mgr = CheckpointManager(ck, memory=region)
    mgr.save(4, model=m, optimizer=opt, scheduler=sched, data_state={"pos": 1}, memory=True)
    mgr.close()
    host, why = read_slot_state(region, ck)
    assert host is not None, why
    monkeypatch.setattr(devio, "is_gpu", lambda loc: True)  # the GPU branch, with the CPU as its device
    calls = []
    real = devio.read_to_device
    monkeypatch.setattr(devio, "read_to_device", lambda jobs, dev: calls.append([j.name for j in jobs]) or real(jobs, "cpu"))
    dev, why = read_slot_state(region, ck, map_location="cpu")
    assert dev is not None, why
    assert sorted(calls[0]) == ["model.safetensors", "state.safetensors"]
    for k in ("model", "optimizer", "scheduler", "data"):
        assert same_nested(host[k], dev[k]), k
    assert dev["rng"]["torch"].device.type == "cpu"
    info, _ = mem.Region(region).newest(ck)
    name, off, size = next(f for f in info.files if f[0] == "state.safetensors")
    with open(info.path, "r+b") as f:  # a flipped byte in the optimizer's state, inside the slot
        f.seek(mem.PAYLOAD_OFFSET + off + size - 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    state, why = read_slot_state(region, ck, map_location="cpu")
    assert state is None and re.search(r"state.safetensors fails its \w+ checksum", why), why


# ------------------------------------------------------------------------------ the GPU benchmark
@pytest.mark.slow  # a real process
def test_the_gpu_benchmark_without_cuda_exits_0_and_says_why_it_measured_nothing(tmp_path):
    from tests.helpers import REPO, env_for_children, run_py

    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    env = {**env_for_children(), "CUDA_VISIBLE_DEVICES": "", "CKPT_BENCH_DIR": str(tmp_path)}  # no GPU, here or there
    r = run_py(["-m", "benchmarks", "--only", "gpu"], env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpu: this section needs a CUDA GPU and measured nothing: no CUDA GPU on this machine" in r.stderr, r.stderr
    assert "gpu_skipped" in r.stdout and "gpu_error" not in r.stdout + r.stderr
    j = run_py(["-m", "benchmarks", "--only", "gpu", "--json"], env=env, timeout=120, check=True)
    out = json.loads(j.stdout)
    assert "still to be measured" in out["gpu_skipped"] and "gpu_state_bytes" not in out
    assert (results.read_bytes() if results.exists() else None) == before  # nothing measured, nothing written


@pytest.mark.slow  # ~15 s
def test_the_gpu_benchmark_runs_every_path_as_a_dry_run_on_the_cpu(tmp_path, monkeypatch):
    # The same script with device="cpu" and a tiny model: every saver, the memory slots and the loads run,
    # so a GPU machine's short time is not spent finding a typo. The figures mean nothing here.
    import benchmarks.gpu as bg

    monkeypatch.setattr(bg, "WORK", tmp_path)
    monkeypatch.setattr(bg, "_drop_caches", lambda: False)  # never the shared machine's page cache from a test
    out = bg.bench_gpu(True, "cpu")
    assert out["gpu_model"] == "dry" and out["gpu_name"] == "cpu (dry run)"
    for k in ("gpu_save_s", "gpu_async_stall_s", "gpu_memory_stall_s", "gpu_memory_load_s", "gpu_load_s",
              "gpu_safetensors_load_s", "gpu_load_vs_safetensors", "gpu_save_vs_dd"):
        assert isinstance(out.get(k), (int, float)) and out[k] >= 0, (k, out.get(k))
    table = "\n".join(bg.gpu_table(out))
    assert "| figure | value | goal |" in table and "None" not in table.split("| figure |")[0]
    assert not (tmp_path / "gpu").exists()  # its files are gone
    assert "Still to be measured" in "\n".join(bg.gpu_table({"gpu_skipped": "no CUDA GPU"}))


def test_the_fp16_grad_scalers_state_round_trips_through_a_memory_checkpoint(tmp_path):
    # What the built-in trainer saves with precision fp16 (devio.grad_scaler), through the memory slot a
    # restart reads first: the scale, its growth tracker and settings come back as they were.
    from ckpt_daemon.checkpoint import CheckpointManager
    from tests.helpers import make_state

    fp16 = dv.place("cpu", "fp16", False, devio.present())
    scaler = devio.grad_scaler(fp16)
    assert scaler is not None
    m, opt, sched = make_state(width=64)
    with devio.autocast(fp16):
        loss = m(torch.randn(4, 64)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    want = scaler.state_dict()
    assert want["_growth_tracker"] == 1
    region, ck = tmp_path / "region", tmp_path / "ck"
    mgr = CheckpointManager(ck, memory=region)
    mgr.save(6, model=m, optimizer=opt, scheduler=sched, scaler=scaler, memory=True)
    mgr.close()
    m2, opt2, sched2 = make_state(width=64, seed=1)
    fresh = devio.grad_scaler(fp16)
    assert fresh.state_dict() != want
    mgr2 = CheckpointManager(ck, memory=region)
    try:
        loaded = mgr2.load("latest", model=m2, optimizer=opt2, scheduler=sched2, scaler=fresh)
    finally:
        mgr2.close()
    assert loaded is not None and loaded.step == 6 and loaded.from_memory
    assert fresh.state_dict() == want


# ------------------------------------------------------------------------------ docs/gpu.md's examples
def test_the_gpu_pages_config_examples_are_valid_and_do_what_the_text_says(tmp_path):
    from ckpt_daemon.config import parse_config
    from tests.snippets import doc_block

    tc = parse_config(doc_block("docs/gpu.md", "precision: bf16"), tmp_path / "config.yaml").trainer
    assert (tc.device, tc.precision, tc.deterministic) == ("auto", "bf16", True)
    p = dv.place(tc.device, tc.precision, tc.deterministic, FOUR_H200)
    assert (p.device, p.autocast_dtype, p.grad_scaler) == ("cuda:0", "bfloat16", False)
    assert dv.deterministic_env({}, p) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert dv.place(tc.device, tc.precision, tc.deterministic, NO_GPU).device == "cpu"
    # torchrun from the daemon's command: four ranks of the built-in trainer, each on its own GPU over NCCL
    cmd = parse_config(doc_block("docs/gpu.md", "torch.distributed.run"), tmp_path / "config.yaml").training.command
    assert cmd[:5] == ["{python}", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "trainer", "--config", "{config}"]
    ranks = [dv.place("auto", "fp32", False, FOUR_H200, dv.Job(rank=i, world=4, local_rank=i, local_world=4))
             for i in range(4)]
    assert [(r.device, r.backend) for r in ranks] == [(f"cuda:{i}", "nccl") for i in range(4)]
