"""python -m trainer.generate --checkpoint PATH (--prompt TEXT | --prompt-ids 1,2,3) [--tokens N] [--temperature T] [--seed S]

Samples from a full native checkpoint or a weights-only export of the built-in model, and from a
Hugging Face model folder (an export of a Hugging Face checkpoint, or a `checkpoint-<step>/` folder):
one whose config.json names a `model_type` is loaded with transformers' AutoModelForCausalLM, with the
tokenizer in the folder if there is one, else from the token ids given with --prompt-ids (the
generated ids are printed then). Nothing is ever downloaded: the Hugging Face hub is switched offline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ckpt_daemon.checkpoint import load_weights
from ckpt_daemon.errors import CheckpointError, CkptError, UsageError, crash_summary
from ckpt_daemon.fsutil import file_digest_problem, read_json_file
from ckpt_daemon.models.gpt import GPT, gpt_from_weights
from ckpt_daemon.store import catalog as cat

# Any one of these in the folder means it carries its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def load_model(path: Path) -> tuple[GPT, list[str]]:
    """The built-in model and its vocabulary (characters; [] when it was trained on token ids) from a
    checkpoint or an export folder. What the folder says about itself is checked before it is used."""
    tensors, meta = load_weights(path)
    conf = meta.get("config")
    conf = conf if isinstance(conf, dict) else {}
    if "model" not in conf:
        raise CkptError(f"{path} holds no model config of the built-in trainer nor a Hugging Face config.json with a "
                        "model_type; it cannot be sampled with trainer.generate. Load its weights into your own model.")
    model = gpt_from_weights(tensors, conf["model"], str(path))
    vocab = conf.get("vocab")
    ok = isinstance(vocab, list) and len(vocab) == model.config.vocab_size and all(isinstance(c, str) for c in vocab)
    return model, vocab if ok else []


def hf_config(path: Path) -> Optional[dict]:
    """The folder's config.json if it is a Hugging Face one (it names a model_type)."""
    conf = read_json_file(path / "config.json", 16 << 20) if path.is_dir() else None
    return conf if isinstance(conf, dict) and isinstance(conf.get("model_type"), str) else None


def check_export(path: Path) -> None:
    """An export's files against the checksums in its metadata.json; a Hugging Face Trainer checkpoint
    folder (it has no checksums of its own) by the catalog's structural check."""
    if (path / "trainer_state.json").is_file():
        _, status, reason, _ = cat.check_entry(path, verify=False)
        if status != "complete":
            raise CheckpointError(f"{path} is {status} ({reason}); it cannot be sampled. Use another checkpoint.")
    meta = read_json_file(path / "metadata.json", 16 << 20)
    files = meta.get("files") if isinstance(meta, dict) else None
    for name, rec in (files.items() if isinstance(files, dict) else ()):
        p = path / name
        if "/" in name or not isinstance(rec, dict) or not p.is_file() and name not in ("model.safetensors", "config.json"):
            continue  # a tokenizer file someone removed is not damage to the model
        if not p.is_file() or file_digest_problem(p, rec) is not None:
            raise CheckpointError(f"{p} does not match the checksum in {path / 'metadata.json'}: the export was damaged "
                                  "after it was written. Consolidate the checkpoint again.")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise UsageError(f"--prompt-ids {text!r} is not a list of token ids; write them like 1,2,3.") from None
    if not ids or min(ids) < 0:
        raise UsageError("--prompt-ids needs at least one token id, none of them negative (e.g. 1,2,3).")
    return ids


def generate_hf(path: Path, conf: dict, args) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise CkptError(f"{path} is a Hugging Face model ({conf['model_type']}); sampling it needs transformers "
                        "(pip install transformers).") from None
    has_tok = any((path / n).is_file() for n in TOKENIZER_FILES)
    if not args.prompt_ids and not has_tok:
        raise UsageError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}...), so a text prompt cannot be "
                         "encoded: give the prompt as token ids with --prompt-ids 1,2,3 (the output is token ids too).")
    check_export(path)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tok else None
    except (OSError, ValueError, KeyError) as exc:
        raise CkptError(f"transformers cannot load {path} ({(str(exc).splitlines() or [''])[0][:200]}). It must hold a "
                        "causal language model (config.json and its weights); nothing is downloaded.") from None
    ids = parse_ids(args.prompt_ids) if args.prompt_ids else tok(args.prompt)["input_ids"]
    vocab = model.get_input_embeddings().num_embeddings
    if not ids or max(ids) >= vocab:
        raise UsageError(f"The prompt's token ids must lie in 0..{vocab - 1}, the model's vocabulary; got {ids[:8]}.")
    out = _sample(model, ids, args, tok)
    if args.prompt_ids or tok is None:
        return ",".join(map(str, out))
    return tok.decode(out, skip_special_tokens=True)


def _sample(model, ids: list[int], args, tok) -> list[int]:
    gc = model.generation_config
    pad = next((t for t in (gc.pad_token_id, getattr(tok, "pad_token_id", None), gc.eos_token_id) if isinstance(t, int)), 0)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens, pad_token_id=pad, **sampling)
    return y[0].tolist()


def generate_builtin(path: Path, args) -> str:
    model, vocab = load_model(path)
    g = torch.Generator().manual_seed(args.seed)
    if args.prompt_ids:
        ids = parse_ids(args.prompt_ids)
        if max(ids) >= model.config.vocab_size:
            raise UsageError(f"The prompt's token ids must lie in 0..{model.config.vocab_size - 1}; got {ids[:8]}.")
        out = model.generate(torch.tensor([ids]), args.tokens, temperature=args.temperature, generator=g)[0].tolist()
        return ",".join(map(str, out))
    if not vocab:
        raise UsageError("The model was trained on token ids, not characters: give the prompt with --prompt-ids 1,2,3 "
                         "and decode its output with your tokenizer.")
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = [stoi[c] for c in args.prompt if c in stoi] or [0]
    out = model.generate(torch.tensor([ids]), args.tokens, temperature=args.temperature, generator=g)[0].tolist()
    return "".join(vocab[i] for i in out)


def generate(args) -> str:
    """The text (or token ids) sampled for the arguments of `ckpt-daemon generate` (see trainer/cli.py)."""
    path = Path(args.checkpoint)
    try:
        conf = hf_config(path)
        return generate_hf(path, conf, args) if conf else generate_builtin(path, args)
    except CkptError:
        raise
    except Exception as exc:  # what a crafted folder makes a loader raise (no list can foresee all of it)
        raise CheckpointError(f"{path} cannot be sampled ({crash_summary(exc)}). Give a checkpoint-<step> "
                              "folder, a folder written by `ckpt-daemon consolidate`, or a Hugging Face model "
                              "folder.") from None


def main(argv=None) -> int:
    from ckpt_daemon.cliutil import module_main
    from trainer.cli import add_generate_arguments, run_generate

    return module_main("python -m trainer.generate", __doc__.split("\n\n")[1], add_generate_arguments, run_generate, argv)


if __name__ == "__main__":
    sys.exit(main())
