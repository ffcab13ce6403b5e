"""A nanoGPT-style training script that knows nothing of ckpt-daemon except $CKPT_RESUME.

It saves `model_step_<step>.pt` with a plain torch.save straight into the folder (not atomically, as
such scripts do), saves and exits 143 on SIGTERM, and exits 0 at --max-steps. With --self-resume it
ignores $CKPT_RESUME and loads its own newest file, as many scripts do.

    python plain_train.py CKPT_DIR [--every N] [--max-steps N] [--self-resume]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import sys

import torch

from ckpt_daemon.models.gpt import GPT, GPTConfig
from trainer.data import load_corpus


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt_dir")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--self-resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus(None, 20000, 7, 0.1)
    mc = GPTConfig(vocab_size=corpus.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    resume = os.environ.get("CKPT_RESUME", "none")
    if args.self_resume:
        found = sorted(glob.glob(os.path.join(args.ckpt_dir, "model_step_*.pt")),
                       key=lambda p: int(re.search(r"model_step_(\d+)\.pt$", p).group(1)))
        resume = found[-1] if found else "none"
    step = 0
    if resume != "none":
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
    print(f"resumed from {resume} at step {step}", flush=True)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    data = torch.from_numpy(corpus.train.astype("int64"))
    while step < args.max_steps:
        g = torch.Generator().manual_seed(step)
        ix = torch.randint(len(data) - 33, (8,), generator=g)
        x = torch.stack([data[i : i + 32] for i in ix])
        y = torch.stack([data[i + 1 : i + 33] for i in ix])
        _, loss = model(x, y)
        loss_v = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.every == 0 or stop or step == args.max_steps:
            path = os.path.join(args.ckpt_dir, f"model_step_{step}.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "val_loss": loss_v, "config": {"model": mc.to_dict(), "vocab": corpus.vocab}}, path)
            print(f"saved {path} loss {loss_v:.4f}", flush=True)
        if stop:
            return 128 + stop[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
