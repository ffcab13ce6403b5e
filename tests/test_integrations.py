"""ckpt_daemon.integrations: resume_path, StopRequest, Heartbeat, and the Hugging Face and Lightning
callbacks, with the real libraries in real subprocesses (tiny CPU models built from configs, no
download). For each trainer one test goes through a daemon's cycle: SIGTERM mid-training -> the
current step is saved where the trainer saves and the process exits 143; a restart with
CKPT_RESUME set to that checkpoint continues at its step and exits 0 at max_steps; heartbeat.json
and metrics.jsonl follow.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ckpt_daemon
from ckpt_daemon.integrations import common
from ckpt_daemon.integrations.common import Heartbeat, StopRequest, resume_path
from ckpt_daemon.store import catalog
from tests.helpers import PY, env_for_children, write_config

HF_SCRIPT = """
import os, time
import torch
import ckpt_daemon
from ckpt_daemon.integrations.hf import CkptDaemonCallback
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

torch.manual_seed(0)

class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 256
    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        print("BEGIN", state.global_step, flush=True)
    def on_step_end(self, args, state, control, **kw):
        time.sleep(float(os.environ["STEP_SLEEP"]))

model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
args = TrainingArguments(output_dir=os.environ["CKPT_DAEMON_CHECKPOINTS"], save_steps=5,
                         max_steps=int(os.environ["MAX_STEPS"]), per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[CkptDaemonCallback(), Probe()])
trainer.train(resume_from_checkpoint=ckpt_daemon.resume_path())
print("FINISHED", trainer.state.global_step, flush=True)
"""

LIGHTNING_SCRIPT = """
import os, time
import torch
import ckpt_daemon
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from ckpt_daemon.integrations.lightning import CkptDaemonCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        time.sleep(float(os.environ["STEP_SLEEP"]))
        return loss
    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
        if float(os.environ.get("VAL_SLEEP", "0")):
            print("VALIDATING", self.trainer.global_step, flush=True)
            time.sleep(float(os.environ["VAL_SLEEP"]))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        print("BEGIN", trainer.global_step, flush=True)

pl.seed_everything(0, verbose=False)
x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
ckpt = ModelCheckpoint(dirpath=os.environ["CKPT_DAEMON_CHECKPOINTS"], every_n_train_steps=5, save_top_k=-1,
                       filename="{epoch}-{step}")
trainer = pl.Trainer(max_steps=int(os.environ["MAX_STEPS"]), callbacks=[ckpt, CkptDaemonCallback(), Probe()],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     devices=1, log_every_n_steps=1, val_check_interval=8, limit_val_batches=1,
                     num_sanity_val_steps=0)
trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=64),
            ckpt_path=ckpt_daemon.resume_path())
print("FINISHED", trainer.global_step, flush=True)
"""


# ------------------------------------------------------------------------------------------ helpers
class Run:
    """One training process, as the daemon would start it (its environment, output to a file)."""

    def __init__(self, tmp: Path, script: str, name: str, token: str, resume: str, max_steps: int,
                 step_sleep: float, **extra_env: str):
        self.tmp, self.name = tmp, name
        self.ckpt_dir, self.metrics = tmp / "checkpoints", tmp / "logs" / "metrics.jsonl"
        path = tmp / "train.py"
        path.write_text(script)
        env = {k: v for k, v in env_for_children().items() if not k.startswith("CKPT_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   CKPT_DAEMON_CHECKPOINTS=str(self.ckpt_dir), CKPT_DAEMON_RUN=token, CKPT_RESUME=resume,
                   CKPT_DAEMON_METRICS=str(self.metrics), CKPT_DAEMON_CONFIG=str(tmp / "config.yaml"),
                   MAX_STEPS=str(max_steps), STEP_SLEEP=str(step_sleep), **extra_env)
        self.out = tmp / f"{name}.out"
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen([PY, str(path)], cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, what: str, pred, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.name}: no {what} within {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n{self.output()[-4000:]}") from None

    def heartbeat(self) -> dict:
        return json.loads((self.ckpt_dir / ".ckpt-daemon" / "heartbeat.json").read_text())


def metrics_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stop_resume_finish(tmp_path: Path, script: str, pattern: str, first_save: str, loss_key: str) -> dict:
    """The daemon's cycle around one trainer; returns what the assertions below need."""
    write_config(tmp_path, {"checkpoints": {"dir": "checkpoints", "pattern": [pattern]}}, tiny=False)
    (tmp_path / "logs").mkdir()
    t0 = time.monotonic()

    # 1. Training is under way (its first regular checkpoint is there): the daemon stops it.
    first = Run(tmp_path, script, "first", "run-one", "none", max_steps=10_000, step_sleep=0.05)
    first.wait_for(first_save, lambda: (first.ckpt_dir / first_save).exists())
    # ... and it has logged a step past that save, so the stop has a step of its own to save (on a busy
    # machine the signal could otherwise come while the trainer is still at the saved step).
    def logged_past_first_save() -> bool:
        try:
            return any(r.get("step", 0) > 5 and loss_key in r for r in metrics_lines(first.metrics))
        except ValueError:  # a line being written
            return False
    first.wait_for("a step past the first save", logged_past_first_save)
    first.proc.send_signal(signal.SIGTERM)
    rc = first.wait()
    out1 = first.output()
    assert rc == 143, f"a stopped trainer must exit 143 (0 would read as finished), got {rc}:\n{out1[-4000:]}"
    cat = catalog.scan(first.ckpt_dir, [pattern], verify=True)
    stop = cat.newest_valid()
    assert stop is not None, [(e.name, e.status, e.reason) for e in cat.entries]
    # It saved the step it was at when the signal came (after the first save, so >= 6), named like
    # the trainer's other checkpoints, and said so.
    assert stop.step >= 6 and stop.name == pattern.format(step=stop.step, epoch=0), stop
    assert f"stopped by SIGTERM at step {stop.step}" in out1, out1[-4000:]
    hb = first.heartbeat()
    assert (hb["step"], hb["run"], hb.get("stopped")) == (stop.step, "run-one", True), hb
    lines1 = metrics_lines(first.metrics)
    assert {r["step"] for r in lines1 if loss_key in r} >= {1, 2, 3, 4, 5, stop.step}, lines1

    # 2. The restart resumes from the checkpoint the daemon chose and finishes.
    second = Run(tmp_path, script, "second", "run-two", str(stop.path), max_steps=stop.step + 3, step_sleep=0)
    rc = second.wait()
    out2 = second.output()
    assert rc == 0, f"reaching max_steps must exit 0, got {rc}:\n{out2[-4000:]}"
    assert f"BEGIN {stop.step}\n" in out2 and f"FINISHED {stop.step + 3}\n" in out2, out2[-4000:]
    assert "the daemon chose to resume" not in out2, out2[-4000:]
    new = [r for r in metrics_lines(second.metrics)[len(lines1):] if loss_key in r]
    assert sorted({r["step"] for r in new}) == [stop.step + 1, stop.step + 2, stop.step + 3], new
    hb = second.heartbeat()
    assert (hb["step"], hb["run"]) == (stop.step + 3, "run-two"), hb
    return {"stop": stop, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------------------- trainer tests
@pytest.mark.slow
def test_hf_trainer_sigterm_saves_exits_143_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    stop_resume_finish(tmp_path, HF_SCRIPT, "checkpoint-{step}", "checkpoint-5/trainer_state.json", "loss")


@pytest.mark.slow
def test_lightning_sigterm_saves_exits_143_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    stop_resume_finish(tmp_path, LIGHTNING_SCRIPT, "epoch={epoch}-step={step}.ckpt", "epoch=0-step=5.ckpt",
                       "train_loss")


@pytest.mark.slow
def test_lightning_sigterm_during_validation_saves_and_exits_143(tmp_path):
    """The signal lands while Lightning validates: its own loop raises SIGTERMException (a SystemExit
    that would exit 0) after the validation; the callback saves the step and makes the exit 143."""
    pytest.importorskip("lightning")
    write_config(tmp_path, {"checkpoints": {"dir": "checkpoints", "pattern": ["epoch={epoch}-step={step}.ckpt"]}},
                 tiny=False)
    run = Run(tmp_path, LIGHTNING_SCRIPT, "val", "run-val", "none", max_steps=10_000, step_sleep=0, VAL_SLEEP="1")
    run.wait_for("validation", lambda: "VALIDATING 8" in run.output())
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait()
    out = run.output()
    assert rc == 143, f"got {rc}:\n{out[-4000:]}"
    stop = catalog.scan(run.ckpt_dir, ["epoch={epoch}-step={step}.ckpt"], verify=True).newest_valid()
    assert stop is not None and stop.name == "epoch=0-step=8.ckpt", stop
    assert "stopped by SIGTERM at step 8" in out, out[-4000:]
    assert (run.heartbeat()["step"], run.heartbeat()["stopped"]) == (8, True)


# ------------------------------------------------------------------------------------- resume_path
@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("CKPT_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def _save(path: Path, step: int) -> Path:
    torch.save({"step": step, "w": torch.full((4,), float(step))}, path)
    return path


@pytest.mark.slow
def test_resume_path_plain_script(tmp_path, clean_env):
    """The one line of the README, in a script of its own, with and without the daemon."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _save(folder / "model_step_5.pt", 5)
    _save(folder / "model_step_9.pt", 9)
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import torch, ckpt_daemon
        ckpt = torch.load(p, weights_only=True) if (p := ckpt_daemon.resume_path()) else None
        print("RESUMED", ckpt["step"] if ckpt else None)
    """))
    env = {k: v for k, v in env_for_children().items() if not k.startswith("CKPT_")}

    def start(**extra: str) -> subprocess.Popen:
        return subprocess.Popen([PY, str(script)], cwd=tmp_path, env={**env, **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def result(p: subprocess.Popen) -> str:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        return out.strip()

    # Under the daemon: its choice (here an older one, to tell it from a scan). Without it: the newest
    # valid checkpoint of the folder, found by scanning. (Both at once: each is mostly torch's import.)
    daemon = start(CKPT_RESUME=str(folder / "model_step_5.pt"), CKPT_DAEMON_CHECKPOINTS=str(folder))
    alone = start(CKPT_DAEMON_CHECKPOINTS=str(folder))
    assert result(daemon) == "RESUMED 5"
    assert result(alone) == "RESUMED 9"


def test_resume_path_under_the_daemon(tmp_path, clean_env):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _save(folder / "model_step_5.pt", 5)
    chosen = _save(folder / "model_step_7.pt", 7)
    clean_env.setenv("CKPT_DAEMON_CHECKPOINTS", str(folder))
    clean_env.setenv("CKPT_RESUME", "none")
    assert resume_path() is None  # a fresh start, even with checkpoints there
    clean_env.setenv("CKPT_RESUME", str(chosen))
    assert resume_path() == str(chosen)
    assert ckpt_daemon.resume_path() == str(chosen)  # the lazy top-level name
    # The daemon's choice vanished before the trainer looked: the newest valid one, with a warning.
    chosen.unlink()
    with pytest.warns(RuntimeWarning, match="no longer exists"):
        assert resume_path() == str(folder / "model_step_5.pt")


def test_resume_path_without_the_daemon(tmp_path, clean_env):
    assert resume_path() is None  # no folder known: a fresh start
    folder = tmp_path / "ckpts"
    folder.mkdir()
    assert resume_path(folder) is None  # an empty folder
    _save(folder / "model_step_5.pt", 5)
    _save(folder / "epoch=0-step=8.ckpt", 8)
    truncated = _save(folder / "model_step_12.pt", 12)
    truncated.write_bytes(truncated.read_bytes()[:-40])  # seen at once (no central directory): skipped
    flipped = _save(folder / "model_step_10.pt", 10)
    data = flipped.read_bytes()
    at = data.index(struct.pack("<4f", *[10.0] * 4))  # the tensor's bytes: only the zip CRC tells
    flipped.write_bytes(data[:at] + b"\x01" + data[at + 1:])
    with pytest.warns(RuntimeWarning, match="model_step_10.pt"):
        assert resume_path(folder) == str(folder / "epoch=0-step=8.ckpt")
    with pytest.warns(RuntimeWarning):
        assert resume_path(folder, patterns=["model_step_{step}.pt"]) == str(folder / "model_step_5.pt")
    # The config names the folder and the pattern (./config.yaml, or $CKPT_DAEMON_CONFIG).
    write_config(tmp_path, {"checkpoints": {"dir": "ckpts", "pattern": ["weights-{step}.bin"]}}, tiny=False)
    _save(folder / "weights-20.bin", 20)
    assert resume_path() == str((folder / "weights-20.bin").resolve())
    clean_env.chdir(folder)
    clean_env.setenv("CKPT_DAEMON_CONFIG", str(tmp_path / "config.yaml"))
    assert resume_path() == str((folder / "weights-20.bin").resolve())


def test_daemon_choice_and_step_of(tmp_path, clean_env):
    assert common.daemon_choice() is None
    clean_env.setenv("CKPT_RESUME", "none")
    assert common.daemon_choice() == (None, 0)
    hf = tmp_path / "checkpoint-40"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    clean_env.setenv("CKPT_RESUME", str(hf))
    assert common.daemon_choice() == (str(hf), 40)
    assert common.step_of(tmp_path / "epoch=3-step=1200.ckpt") == 1200
    assert common.step_of(tmp_path / "model_step_500.pt") == 500
    assert common.step_of(tmp_path / "final.pt") is None


# -------------------------------------------------------------------------------------- StopRequest
def test_stop_request_records_chains_and_restores():
    seen = []
    old_term = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    # Python's own Ctrl+C handler before, whatever this process inherited (nohup or a script's `cmd &`
    # starts it with SIGINT ignored, and then Python installs no handler of its own)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequest()
        assert not stop.requested and stop.exit_code is None
        with pytest.raises(RuntimeError):
            stop.exit()  # never exit 0-or-anything without a stop
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (stop.requested, stop.signal, stop.exit_code) == (True, signal.SIGTERM, 143)
        assert seen == [signal.SIGTERM]  # the previous Python handler still runs
        with pytest.raises(SystemExit) as exc:
            stop.exit()
        assert exc.value.code == 143
        # SIGINT's default handler (KeyboardInterrupt) is replaced, not chained.
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGINT, None)
        assert stop.signal == signal.SIGTERM  # the first signal decides the exit code
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
        # A second Ctrl+C aborts without waiting for the save.
        ctrl_c = StopRequest(signals=(signal.SIGINT,))
        ctrl_c._handle(signal.SIGINT, None)
        assert ctrl_c.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            ctrl_c._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int if old_int is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------- Heartbeat
def test_heartbeat_rate_limit_metrics_and_best_effort(tmp_path, clean_env):
    now = [100.0]
    clean_env.setenv("CKPT_DAEMON_RUN", "tok")
    clean_env.setenv("CKPT_DAEMON_CHECKPOINTS", str(tmp_path / "ck"))
    clean_env.setenv("CKPT_DAEMON_METRICS", str(tmp_path / "logs" / "metrics.jsonl"))
    hb = Heartbeat(every_s=1.0, clock=lambda: now[0])
    read = lambda: json.loads((tmp_path / "ck" / ".ckpt-daemon" / "heartbeat.json").read_text())  # noqa: E731
    assert hb.beat(1) and read()["step"] == 1 and read()["run"] == "tok"
    now[0] += 0.5
    assert not hb.beat(2) and read()["step"] == 1  # rate-limited
    assert hb.beat(3, force=True, saving="checkpoint-3") and read()["saving"] == "checkpoint-3"
    now[0] += 1.5
    assert hb.beat(4, loss=torch.tensor(0.25)) and read()["loss"] == 0.25
    assert hb.metrics(4, loss=torch.tensor(0.5), lr=1e-3, name="x")
    (rec,) = metrics_lines(tmp_path / "logs" / "metrics.jsonl")
    assert rec["step"] == 4 and rec["loss"] == 0.5 and rec["lr"] == 1e-3 and isinstance(rec["time"], float)
    # Never raises: a metrics path under a file, a checkpoint folder that is a file.
    (tmp_path / "file").write_text("")
    bad = Heartbeat(tmp_path / "file" / "ck", metrics_path=tmp_path / "file" / "m.jsonl")
    assert bad.beat(1) is False and bad.metrics(1, loss=1.0) is False
    # Only rank 0 writes; without the daemon there is nowhere to write.
    clean_env.setenv("RANK", "1")
    assert Heartbeat().beat(9, force=True) is False and read()["step"] == 4
    clean_env.delenv("RANK")
    clean_env.delenv("CKPT_DAEMON_CHECKPOINTS")
    clean_env.delenv("CKPT_DAEMON_METRICS")
    assert Heartbeat().beat(1) is False and Heartbeat().metrics(1, loss=1.0) is False


def test_importing_the_package_imports_no_torch_nor_trainers():
    code = ("import sys, ckpt_daemon, ckpt_daemon.integrations; ckpt_daemon.StopRequest; ckpt_daemon.Heartbeat; "
            "ckpt_daemon.resume_path; "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env_for_children(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


# ------------------------------------------------------------------ Lightning and the daemon's state folder
def _lightning_fit(ck: Path) -> list[str]:
    """A real Lightning fit with ModelCheckpoint(dirpath=ck) and the callback; the warnings it gave."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ckpt_daemon.integrations.lightning import CkptDaemonCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=2, save_top_k=-1, filename="{epoch}-{step}")
    trainer = pl.Trainer(max_steps=4, callbacks=[mc, CkptDaemonCallback()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), data)
    assert warnings.filters == before  # the callback left no filter behind
    return [str(w.message) for w in caught]


def test_a_fresh_lightning_run_under_the_daemon_does_not_warn_about_the_state_folder(tmp_path, clean_env):
    pytest.importorskip("lightning")
    from ckpt_daemon import runtime

    ck = tmp_path / "checkpoints"
    runtime.state_dir(ck)  # what the daemon makes in its checkpoint folder before the trainer starts
    clean_env.setenv("CKPT_DAEMON_CHECKPOINTS", str(ck))
    assert os.listdir(ck) == [runtime.STATE_DIR]
    said = _lightning_fit(ck)
    assert not [m for m in said if "exists and is not empty" in m], said
    assert (ck / "epoch=0-step=4.ckpt").is_file()
    # the folder really holds the user's files: Lightning's warning stands
    other = tmp_path / "other"
    runtime.state_dir(other)
    (other / "notes.txt").write_text("mine")
    said = _lightning_fit(other)
    assert [m for m in said if m == f"Checkpoint directory {os.path.realpath(other)} exists and is not empty."], said
    # and so does it for a second run in the folder the first one filled
    assert [m for m in _lightning_fit(ck) if "exists and is not empty" in m]
