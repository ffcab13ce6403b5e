"""`ckpt-daemon list` on what real trainers write (Hugging Face Trainer, Lightning, a plain torch.save
script): `latest` and `best` are marked for every layout, and each checkpoint's metrics are its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import run_py, write_config

HF_SCRIPT = r"""
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

class Tokens(torch.utils.data.Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
# saves every 5 steps, evaluates every 10: half the checkpoints have an evaluation of their own
args = TrainingArguments(output_dir=sys.argv[1], save_steps=5, eval_strategy="steps", eval_steps=10,
                         metric_for_best_model="eval_loss", max_steps=20, per_device_train_batch_size=4,
                         per_device_eval_batch_size=16, report_to=[], use_cpu=True, logging_steps=5,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, learning_rate=0.05)
Trainer(model=model, args=args, train_dataset=Tokens(40), eval_dataset=Tokens(16)).train()
"""

LIGHTNING_SCRIPT = r"""
import sys, torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

pl.seed_everything(0, verbose=False)
x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
ckpt = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=5, save_top_k=-1, filename="{epoch}-{step}",
                       monitor="val_loss", mode="min")
trainer = pl.Trainer(max_steps=20, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, val_check_interval=5,
                     limit_val_batches=1, num_sanity_val_steps=0)
trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=64))
print("BEST", ckpt.best_model_path)
"""


def listing(cfg: Path) -> tuple[dict, str]:
    r = run_py(["-m", "daemon", "list", "--json", "--config", str(cfg)], check=True)
    table = run_py(["-m", "daemon", "list", "--config", str(cfg)], check=True).stdout
    return json.loads(r.stdout), table


def marks_of(table: str, name: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(f"│ {name} ")]
    assert len(rows) == 1, table
    return rows[0].rstrip("│ ").rsplit("│", 1)[-1]


@pytest.mark.slow
def test_hugging_face_latest_best_and_each_checkpoints_own_metrics(tmp_path):
    pytest.importorskip("transformers")
    root = tmp_path / "checkpoints"
    run_py(["-c", HF_SCRIPT, str(root)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": ["checkpoint-{step}"]}}, tiny=False)
    out, table = listing(cfg)
    state = json.loads((root / "checkpoint-20" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    assert out["pointers"] == {"latest": "checkpoint-20", "best": best}
    assert "latest" in marks_of(table, "checkpoint-20") and "best" in marks_of(table, best)
    for e in out["checkpoints"]:
        hist = json.loads((root / e["name"] / "trainer_state.json").read_text())["log_history"]
        own_eval = [r["eval_loss"] for r in hist if r.get("step") == e["step"] and "eval_loss" in r]
        assert "best_metric" not in e["metrics"], e  # the run's best so far is not this checkpoint's metric
        if own_eval:
            assert e["metrics"]["eval_loss"] == own_eval[0]
        else:  # no evaluation at this step: no eval_loss at all (not an earlier step's)
            assert "eval_loss" not in e["metrics"], e
        assert e["metrics"]["loss"] == [r["loss"] for r in hist if r.get("step") == e["step"] and "loss" in r][0]
    assert {e["step"] for e in out["checkpoints"] if "eval_loss" in e["metrics"]} == {10, 20}


@pytest.mark.slow
def test_lightning_latest_and_best(tmp_path):
    pytest.importorskip("lightning")
    root = tmp_path / "checkpoints"
    r = run_py(["-c", LIGHTNING_SCRIPT, str(root)], check=True, timeout=600)
    best = Path(r.stdout.split("BEST ")[-1].strip()).name
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": ["epoch={epoch}-step={step}.ckpt"]}}, tiny=False)
    out, table = listing(cfg)
    newest = max(out["checkpoints"], key=lambda e: e["step"])["name"]
    assert out["pointers"] == {"latest": newest, "best": best}
    assert "latest" in marks_of(table, newest) and "best" in marks_of(table, best)


@pytest.mark.slow
def test_plain_torch_save_latest(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for s in (10, 20, 30):
        torch.save({"model": {"w": torch.ones(2) * s}, "step": s, "val_loss": 1.0 / s}, root / f"model_step_{s}.pt")
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"]}}, tiny=False)
    out, table = listing(cfg)
    assert out["pointers"]["latest"] == "model_step_30.pt" and "latest" in marks_of(table, "model_step_30.pt")
    assert "latest" not in marks_of(table, "model_step_20.pt")
