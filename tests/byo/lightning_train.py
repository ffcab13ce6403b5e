"""A Lightning script wired to ckpt-daemon as the README shows (a tiny model, random data): it resumes
from the daemon's choice, saves on SIGTERM through its ModelCheckpoint and exits 143, and writes the
heartbeat and metrics the daemon shows."""

import os
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ckpt_daemon
from ckpt_daemon.integrations.lightning import CkptDaemonCallback


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        time.sleep(float(os.environ.get("STEP_SLEEP", "0.05")))
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Begin(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        print("BEGIN", trainer.global_step, flush=True)


pl.seed_everything(0, verbose=False)
x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
ckpt = ModelCheckpoint(dirpath=ckpt_daemon.checkpoint_dir("checkpoints"), every_n_train_steps=5, save_top_k=-1,
                       filename="{epoch}-{step}", monitor=None if os.environ.get("NO_BEST") else "val_loss", mode="min")
trainer = pl.Trainer(max_steps=10**6, callbacks=[ckpt, CkptDaemonCallback(), Begin()], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                     log_every_n_steps=5, val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=0)
trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=64),
            ckpt_path=ckpt_daemon.resume_path())
