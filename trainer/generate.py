"""python -m trainer.generate --checkpoint PATH --prompt TEXT [--tokens N] [--temperature T] [--seed S]

Samples text from a full native checkpoint or a weights-only export of the built-in model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ckpt_daemon.errors import CkptError
from ckpt_daemon.checkpoint import load_weights
from ckpt_daemon.gpt import GPT, GPTConfig


def load_model(path: Path) -> tuple[GPT, list[str]]:
    tensors, meta = load_weights(path)
    conf = meta.get("config") or {}
    if "model" not in conf:
        raise CkptError(f"{path} holds no model config of the built-in trainer; it cannot be sampled with trainer.generate.")
    model = GPT(GPTConfig(**conf["model"]))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval()
    return model, conf.get("vocab") or []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-<step> folder or a consolidated model folder")
    ap.add_argument("--prompt", default="the ")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        model, vocab = load_model(Path(args.checkpoint))
    except (CkptError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not vocab:
        print("error: the model was trained on token ids, not characters; decode its output with your tokenizer.", file=sys.stderr)
        return 1
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = [stoi[c] for c in args.prompt if c in stoi] or [0]
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.tokens, temperature=args.temperature, generator=g)[0].tolist()
    print("".join(vocab[i] for i in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
