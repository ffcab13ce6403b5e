"""A Hugging Face Trainer script wired to ckpt-daemon as the README shows (a tiny GPT-2 built from a
config, random tokens, no download): it resumes from the daemon's choice, saves on SIGTERM and exits
143, and writes the heartbeat and metrics the daemon shows.

    python hf_train.py            (under the daemon: the checkpoint folder is $CKPT_DAEMON_CHECKPOINTS)
"""

import os
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import ckpt_daemon
from ckpt_daemon.integrations.hf import CkptDaemonCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class Pace(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        print("BEGIN", state.global_step, flush=True)

    def on_step_end(self, args, state, control, **kw):
        time.sleep(float(os.environ.get("STEP_SLEEP", "0.05")))


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
args = TrainingArguments(output_dir=str(ckpt_daemon.checkpoint_dir("checkpoints")), save_steps=5, eval_strategy="steps",
                         eval_steps=5, metric_for_best_model=None if os.environ.get("NO_BEST") else "eval_loss",
                         max_steps=10**6, num_train_epochs=10**4,
                         per_device_train_batch_size=4, per_device_eval_batch_size=16, report_to=[], use_cpu=True,
                         logging_steps=5, disable_tqdm=True, dataloader_num_workers=0, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(40), eval_dataset=Tokens(16),
                  callbacks=[CkptDaemonCallback(), Pace()])
trainer.train(resume_from_checkpoint=ckpt_daemon.resume_path())
