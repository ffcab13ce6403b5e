"""The command lines of the built-in trainer (`train`) and of generation (`generate`), defined here
without importing torch, so that `ckpt-daemon --help` and the daemon itself stay small; torch is
imported when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ckpt_daemon.cliutil import config_path, number

TRAIN_HELP = "run the built-in trainer (a small GPT) in the foreground"
GENERATE_HELP = "sample text from a checkpoint or an exported model"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, metavar="WHICH",
                   help="latest | best | none | STEP | PATH: where to resume from (default: $CKPT_RESUME, set by the "
                        "daemon, else latest)")
    p.add_argument("--max-steps", type=number(int, 0, 10**15), default=None, metavar="N",
                   help="stop (and exit 0, finished) at step N; overrides trainer.max_steps")


def run_train(args: argparse.Namespace) -> int:
    from ckpt_daemon.config import load_config
    from ckpt_daemon.errors import CkptError
    from trainer.train import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(config_path(args))
        return run(cfg, args.resume or os.environ.get("CKPT_RESUME") or "latest", args.max_steps)
    except CkptError as exc:  # in the trainer's log, where the daemon's crash report quotes it from
        logging.getLogger("trainer").error("%s", exc)
        return exc.exit_code


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint-<step> folder, a consolidated model folder or a Hugging Face model folder")
    p.add_argument("--prompt", default="the ", help="the text to continue (default: 'the ')")
    p.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="the prompt as token ids (1,2,3), for a model without a tokenizer; the output is ids too")
    p.add_argument("--tokens", type=number(int, 1, 100_000), default=200, metavar="N", help="how many tokens to generate (default 200)")
    p.add_argument("--temperature", type=number(float, 0, 100), default=0.8, help="sampling temperature; 0 samples greedily")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0, help="seed of the sampling (default 0)")


def run_generate(args: argparse.Namespace) -> int:
    from trainer.generate import generate

    print(generate(args))
    return 0
