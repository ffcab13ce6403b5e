"""python -m maintenance.consolidate [--config PATH] --from latest|best|STEP|PATH [--average K] [--dtype fp32|bf16|fp16] [--json]

Writes consolidated_models/<YYYYmmdd_HHMMSS>-step<N>/ from any checkpoint the catalog recognises: the
weights only (model.safetensors, tied weights stored once), the model config (config.json) where the
source has one, and metadata.json (source, layout, steps, metrics, dtype, checksums). --average K
averages the weights of the last K valid checkpoints of the same layout up to the source. The export
is verified before it appears under its name, and its size is printed against the full checkpoint's.

What each layout gives:
  ckpt-daemon (native)   the model and its config.json; verified with a forward pass of the built-in model.
  Hugging Face Trainer   the weights of checkpoint-<step>/ (model.safetensors, sharded or pytorch_model.bin)
                         with its own config.json (dtype set to the export's), generation_config.json and
                         tokenizer files: `AutoModelForCausalLM.from_pretrained(export_dir)` loads it (checked
                         here when transformers is installed).
  Lightning .ckpt        the `state_dict` with its keys as they are: load it into your LightningModule with
                         `tensors, _ = ckpt_daemon.checkpoint.load_weights(export_dir)` (it restores tied
                         weights) and `module.load_state_dict(tensors)`; hyper_parameters go to metadata.json.
  torch.save files       the state dict under `state_dict`, `model_state_dict` or `model` (or the file itself
                         when it is a state dict), without torch.compile's `_orig_mod.` prefix; a plain
                         `model_args` (nanoGPT) or `config` dict becomes config.json.

Torch files are loaded only with torch.load(weights_only=True): a file that needs arbitrary unpickling
is refused, never unpickled. Foreign checkpoints are verified (zip CRCs, safetensors headers) first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.cliutil import add_json_argument, config_path, module_main, number
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CheckpointError, CkptError, NoValidCheckpoint, UsageError, crash_summary
from ckpt_daemon.fsutil import (
    atomic_write_json,
    disk_full_error,
    fsync_file,
    hash_file,
    is_enospc,
    loads_json_bounded,
    read_bytes_bounded,
)
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import dtypes
from ckpt_daemon.store import resolve as rs
from ckpt_daemon.store.commit import Scratch
from ckpt_daemon.termtext import inert

DTYPES = dtypes.PRECISIONS  # consolidation.dtype -> torch name (store/dtypes.py)
MODEL_FILE = "model.safetensors"
FORMAT = "ckpt-daemon/consolidated-1"
# Where torch.save dicts keep the model weights, in the order they are looked for.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")
LIGHTNING_MARKERS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "loops")
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper; nanoGPT strips it on load too
# Model configs under these keys of a torch.save dict become config.json (nanoGPT's model_args first).
CONFIG_KEYS = ("model_args", "config")
STEP_KEYS = ("global_step", "step", "iter_num", "iteration")
HF_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
HF_ADAPTERS = ("adapter_model.safetensors", "adapter_model.bin")
# Copied from a Hugging Face checkpoint next to its weights so the export loads and tokenizes on its own.
HF_COPY = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
           "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
JSON_MAX = 64 << 20


@dataclass
class Source:
    """One checkpoint loaded for export: its weights and what it says about itself."""

    entry: cat.Entry
    trainer: str  # ckpt-daemon | huggingface | lightning | torch.save | safetensors
    tensors: dict
    model_config: Optional[dict] = None  # becomes config.json
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # more for metadata.json
    copy_files: list = field(default_factory=list)  # files copied as they are (tokenizer...)
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------ safe loading
class UnsafeCheckpointError(CheckpointError):
    """A torch file that only full unpickling could load: refused, never unpickled."""


def load_torch_file(path: Path) -> Any:
    """torch.load(weights_only=True) of an untrusted file; every failure is a CkptError naming the file."""
    import pickle

    import torch

    path = Path(path)
    _require_regular(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=cat.sniff(path) == "zip")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded safely: {_unpickle_reason(str(exc))}, and ckpt-daemon loads torch files only "
            "with torch.load(weights_only=True), which refuses to unpickle arbitrary Python objects because doing so "
            "can run any code. The file was left untouched. Save plain tensors, numbers, strings, lists and dicts "
            "(e.g. `torch.save({'model_state_dict': model.state_dict()}, path)`), or, only if you trust the file, "
            "load it yourself with weights_only=False and save its state dict again.") from None
    except Exception as exc:  # crafted bytes make torch's unpickler raise anything (IndexError, KeyError, struct.error...)
        raise CheckpointError(
            f"{path} cannot be read as a torch file ({crash_summary(exc)}). It is truncated, damaged or not a torch.save "
            "file; it was left untouched. Use another checkpoint.") from None



def _unpickle_reason(msg: str) -> str:
    m = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", msg)
    if m:
        return f"it holds a pickled Python object that needs `{m.group(1)}`"
    m = re.search(r"WeightsUnpickler error: ([^\n]{1,200})", msg)
    return f"it holds something torch's safe loader refuses ({m.group(1).rstrip('.') if m else 'see torch.load'})"


def _require_regular(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (symlinks are never followed); it was not used.")


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _require_regular(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:200]}); use another checkpoint.") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return loads_json_bounded(read_bytes_bounded(path, JSON_MAX), what)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({str(exc)[:200]}); fix or remove it and try again.") from None


def is_state_dict(v: Any) -> bool:
    import torch

    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) for k in v) and \
        any(isinstance(t, torch.Tensor) for t in v.values())


def is_lightning(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and any(k in obj for k in LIGHTNING_MARKERS)


def find_weights(obj: Any) -> Optional[tuple[Optional[str], dict]]:
    """(key, state dict) of the model weights in a loaded torch file (key None: the file is a state
    dict itself), or None when there are none."""
    if not isinstance(obj, dict):
        return None
    for k in WEIGHT_KEYS:
        if is_state_dict(obj.get(k)):
            return k, obj[k]
    return (None, obj) if is_state_dict(obj) else None


def _only_tensors(sd: dict, where: str) -> dict:
    import torch

    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"The weights in {where} include {bad!r}, a {type(sd[bad]).__name__} and not a tensor; "
                              "an export holds tensors only. Remove it from the state dict and save again.")
    return dict(sd)


def _plain_json(v: Any) -> Optional[dict]:
    """v if it is a dict that JSON can hold as it is (a model config), else None."""
    if not isinstance(v, dict):
        return None
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # a crafted file nests as deep as it likes
        return None
    return v


def _scalar_metrics(obj: dict) -> dict:
    import torch

    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = v.item()
        if isinstance(k, str) and re.search(r"loss|acc|metric|score|ppl|perplexity", k) and \
                isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


# --------------------------------------------------------------------------------- each layout
def load_source(e: cat.Entry) -> Source:
    if e.layout == "native":
        return _load_native(e)
    v = cat.verify_entry(e)  # zip CRCs and safetensors headers: damage anywhere is found before use
    if not v.valid:
        raise CheckpointError(f"{e.name} fails verification: {v.reason}. It was not used; pick another checkpoint "
                              "with --from.")
    return _load_hf(e) if e.layout == "hf" else _load_file(e)


def _load_native(e: cat.Entry) -> Source:
    from ckpt_daemon.checkpoint import read_checkpoint

    try:
        state = read_checkpoint(e.path)  # every file verified against its checksum
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{e.name} cannot be read ({str(exc)[:200]}); it was not used.") from None
    conf = state["config"] if isinstance(state["config"], dict) else {}
    model = conf.get("model") if isinstance(conf.get("model"), dict) else None
    return Source(e, "ckpt-daemon", dict(state["model"]), model, e.metrics or state["manifest"].get("metrics", {}),
                  {"config": conf})


def _load_hf(e: cat.Entry) -> Source:
    folder = e.path
    tensors: dict = {}
    for f in _hf_weight_files(folder):
        part = _load_safetensors(f) if f.name.endswith(".safetensors") else _torch_weights(f)
        tensors.update(part)
    conf = _read_json(folder / "config.json", "config.json") if (folder / "config.json").exists() else None
    if conf is not None and not isinstance(conf, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object; fix it or remove it and try again.")
    copies = [folder / n for n in HF_COPY if _is_regular(folder / n)]
    return Source(e, "huggingface", tensors, conf, dict(e.metrics), copy_files=copies)


def _hf_weight_files(folder: Path) -> list[Path]:
    for index, single in HF_WEIGHTS:
        if (folder / index).exists():
            idx = _read_json(folder / index, index)
            names = sorted(set((idx.get("weight_map") or {}).values())) if isinstance(idx, dict) else []
            if not names or not all(isinstance(n, str) and "/" not in n and not n.startswith(".") for n in names):
                raise CheckpointError(f"{folder / index} does not list its weight files as plain names in the folder; "
                                      "the checkpoint was not used.")
            return [folder / n for n in names]
        if (folder / single).exists():
            return [folder / single]
    adapter = next((n for n in HF_ADAPTERS if (folder / n).exists()), None)
    if adapter:
        raise CheckpointError(f"{folder} holds only an adapter ({adapter}), not a whole model. Merge it into its base "
                              "model (peft's merge_and_unload) and save that, then consolidate the result.")
    raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index); there are no "
                          "weights to export.")


def _torch_weights(path: Path) -> dict:
    obj = load_torch_file(path)
    found = find_weights(obj)
    if found is None:
        raise CheckpointError(f"{path} holds no state dict of tensors; there are no weights to export.")
    return _only_tensors(found[1], str(path))


def _load_file(e: cat.Entry) -> Source:
    if e.path.name.endswith(".safetensors") or cat.sniff(e.path) == "safetensors":
        return Source(e, "safetensors", _load_safetensors(e.path))
    return source_from_dict(e, load_torch_file(e.path))


def source_from_dict(e: cat.Entry, obj: Any) -> Source:
    if is_lightning(obj):
        if not is_state_dict(obj["state_dict"]):
            raise CheckpointError(f"{e.path} is a Lightning checkpoint without weights in its state_dict.")
        info = {"lightning": {k: obj[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}}
        hp = _plain_json(obj.get("hyper_parameters"))
        if hp is not None:
            info["hyper_parameters"] = hp
        notes = [("Lightning state_dict keys are kept as they are: load them into your LightningModule "
                  "(module.load_state_dict)")]
        return Source(e, "lightning", _only_tensors(obj["state_dict"], str(e.path)), None,
                      {**_scalar_metrics(obj), **e.metrics}, info, notes=notes)
    found = find_weights(obj)
    if found is None:
        keys = ", ".join(repr(k) for k in list(obj)[:12]) if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{e.path} holds no model weights where ckpt-daemon looks for them: a state dict under "
            f"{', '.join(map(repr, WEIGHT_KEYS))}, or the file itself being one (it holds {keys}). Save the model's "
            "state_dict() under one of those keys.")
    key, sd = found
    tensors = _only_tensors(sd, str(e.path))
    notes = []
    if any(k.startswith(COMPILE_PREFIX) for k in tensors):
        tensors = {k.removeprefix(COMPILE_PREFIX): v for k, v in tensors.items()}
        notes.append(f"removed torch.compile's {COMPILE_PREFIX!r} prefix from the weight names")
    conf, conf_key = None, None
    if key is not None:
        conf_key = next((k for k in CONFIG_KEYS if _plain_json(obj.get(k)) is not None), None)
        conf = obj[conf_key] if conf_key else None
    info = {"weights_key": key, "config_key": conf_key}
    return Source(e, "torch.save", tensors, conf, {**(_scalar_metrics(obj) if key else {}), **e.metrics}, info,
                  notes=notes)


# ---------------------------------------------------------------------------------- which sources
def resolve_sources(cfg: Config, which: str, average: int) -> list[cat.Entry]:
    """The source checkpoint and, for --average K, the K-1 valid ones of the same layout before it."""
    if average < 1:
        raise UsageError("--average must be at least 1.")
    c, src = _pick(cfg, which)
    if not src.valid:
        raise NoValidCheckpoint(f"{src.name} cannot be consolidated: it is {src.status} ({src.reason}).")
    by_step = {e.step: e for e in (c.valid() if c else []) if _same_kind(e, src) and e.step < src.step}
    pool = [*by_step.values(), src]  # one per step: of Lightning's re-saves of a step, the newest
    if average > len(pool):
        raise UsageError(f"--average {average} needs {average} valid {_layout_name(src)} checkpoints up to step "
                         f"{src.step}; there are {len(pool)}.")
    return pool[-average:]


def _same_kind(e: cat.Entry, src: cat.Entry) -> bool:
    return e.layout == src.layout and (e.layout != "file" or e.path.suffix == src.path.suffix)


def _layout_name(e: cat.Entry) -> str:
    return {"hf": "Hugging Face", "file": f"{e.path.suffix or 'single-file'}"}.get(e.layout, e.layout)


def _pick(cfg: Config, which: str) -> tuple[Optional[cat.Catalog], cat.Entry]:
    """What --from names (store.resolve's rule, the same as every command's); it must be valid."""
    try:
        w = rs.parse_which(which)
    except rs.Unresolved:
        w = None
    if w is None or (isinstance(w, Path) and not os.path.lexists(w)):
        raise UsageError(f"--from {which!r} is not understood: use latest, best, a step number or the path of a "
                         "checkpoint.")
    home, src = rs.resolve(cat.scan_config(cfg), w, patterns=cfg.checkpoints.pattern)
    if not src.valid and isinstance(w, int):
        raise NoValidCheckpoint(f"There is no valid {_layout_name(src)} checkpoint at step {src.step} in "
                                f"{cfg.checkpoint_dir}: {src.name} is {src.status} ({src.reason}).")
    return home, src


# ------------------------------------------------------------------------------------ the weights
def combine(sources: list[Source], tdtype) -> dict:
    """The last source's weights (or the mean of all, accumulated in float64) in `tdtype`; integer
    tensors are the last source's; tied weights stay tied (one tensor under both names)."""
    import torch

    from ckpt_daemon.checkpoint import split_tied

    _check_same_tensors(sources)
    models = [s.tensors for s in sources]
    last = models[-1]
    _, aliases = split_tied(last)
    out: dict = {}
    for k, t in last.items():
        if k in aliases:
            continue
        if t.is_floating_point():
            acc = sum(m[k].to(torch.float64) for m in models) / len(models) if len(models) > 1 else t
            out[k] = acc.to(tdtype).contiguous()
        else:
            out[k] = t.contiguous()
    return {k: out[aliases.get(k, k)] for k in last}


def _check_same_tensors(sources: list[Source]) -> None:
    ref = sources[-1]
    for s in sources[:-1]:
        a, b = set(s.tensors), set(ref.tensors)
        if a != b:
            diff = sorted(a ^ b)
            raise CkptError(
                f"{s.entry.name} and {ref.entry.name} hold different sets of tensors ({len(a - b)} only in the first, "
                f"{len(b - a)} only in the second, e.g. {diff[0]!r}); they cannot be averaged. Average checkpoints of "
                "the same model with a smaller --average.")
        bad = next((k for k in b if s.tensors[k].shape != ref.tensors[k].shape or s.tensors[k].dtype != ref.tensors[k].dtype), None)
        if bad is not None:
            raise CkptError(
                f"{bad!r} is {tuple(s.tensors[bad].shape)} {s.tensors[bad].dtype} in {s.entry.name} but "
                f"{tuple(ref.tensors[bad].shape)} {ref.tensors[bad].dtype} in {ref.entry.name}; they cannot be "
                "averaged. Average checkpoints of the same model with a smaller --average.")


def same_bits(a, b) -> bool:
    """Bit-for-bit equality of two tensors (NaNs included), dtype and shape too."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    def raw(t):
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


# ------------------------------------------------------------------------------------- the export
def write_export(dst: Path, tensors: dict, json_files: dict, copies: list, meta: dict,
                 verify: Callable[[Path], str]) -> str:
    """Write the export into a temp sibling of `dst`, verify it there, then rename it into place: an
    export under its final name is always complete and verified. Returns what `verify` found."""
    from ckpt_daemon.checkpoint import split_tied
    from ckpt_daemon.store import safetensors_file as stfile

    # Built in the state folder's scratch space (a lock marks it live; a killed export's folder is removed by
    # the next job of any kind), verified there, then renamed into place.
    try:
        scratch = Scratch(dst.parent, f"export-{dst.name}")
    except OSError as exc:
        if is_enospc(exc):
            raise disk_full_error("write the consolidated model", dst.parent, exc) from None
        raise
    with scratch:
        tmp = scratch.path
        try:
            uniq, aliases = split_tied(tensors)
            with open(tmp / MODEL_FILE, "xb") as f:
                # "format": "pt" is what transformers expects of a safetensors file; "aliases" are the tied names
                size, digest = stfile.write_safetensors(f, uniq, {"format": "pt", "writer": "ckpt-daemon/weights-1",
                                                                "aliases": json.dumps(aliases)})
                f.flush()
                os.fsync(f.fileno())
            files = {MODEL_FILE: {"size": size, "sha256": digest}}
            for name, obj in json_files.items():
                atomic_write_json(tmp / name, obj)
            for src in copies:
                shutil.copyfile(src, tmp / src.name, follow_symlinks=False)
                fsync_file(tmp / src.name)
            for name in [*json_files, *(p.name for p in copies)]:
                files[name] = {"size": (tmp / name).stat().st_size, "sha256": hash_file(tmp / name)}
            atomic_write_json(tmp / "metadata.json", {**meta, "files": files})
            check = verify(tmp)
            atomic_write_json(tmp / "metadata.json", {**meta, "files": files, "verified": check})
            scratch.commit(dst)
        except OSError as exc:
            if is_enospc(exc):
                raise disk_full_error("write the consolidated model", dst.parent, exc) from None
            raise
    return check


def verify_export(folder: Path, expected: dict, src: Source) -> str:
    """Reload the written export (checksum verified) bit for bit, then load it the way it will be used."""
    from ckpt_daemon.checkpoint import load_weights

    back, _ = load_weights(folder)
    bad = next((k for k in expected if k not in back or not same_bits(back[k], expected[k])), None)
    if bad is not None or set(back) != set(expected):
        raise CkptError(f"The export of {src.entry.name} does not reload bit-exact (first difference: "
                        f"{bad or min(set(back) ^ set(expected))!r}); it was removed and nothing was written. "
                        "Check the disk and the memory of this machine, then try again.")
    said = f"reloaded {len(back)} tensors bit-exact"
    conf = src.model_config or {}
    if src.trainer == "ckpt-daemon" and conf:
        return f"{said}; {_check_builtin(folder, back, conf)}"
    if src.trainer == "huggingface" and conf.get("model_type"):
        return f"{said}; {_check_transformers(folder, conf)}"
    return said


def _check_builtin(folder: Path, tensors: dict, conf: dict) -> str:
    import torch

    from ckpt_daemon.models.gpt import gpt_from_weights

    model = gpt_from_weights(tensors, conf, folder.name)  # the config comes from the checkpoint: checked first
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, min(8, model.config.block_size), dtype=torch.long))
    if not torch.isfinite(logits).all():
        raise CkptError(f"The consolidated model produces non-finite outputs; it was removed. The source checkpoint "
                        f"({folder.name}) holds non-finite weights: consolidate an earlier one.")
    return f"loaded into the model, forward pass OK (logits {tuple(logits.shape)})"


def _check_transformers(folder: Path, conf: dict) -> str:
    """Load the export with transformers, offline, and refuse one with missing or unexpected keys."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        return "transformers is not installed here, so from_pretrained was not tried"
    if conf.get("auto_map"):
        return "a model with its own code (auto_map): not loaded, that would need trust_remote_code"
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as exc:
        return f"transformers {transformers.__version__} does not know this model ({str(exc).splitlines()[0][:120]}): not loaded"
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CkptError(f"transformers cannot load the export ({cls.__name__}.from_pretrained: "
                        f"{(str(exc).splitlines() or [''])[0][:200]}); it was removed. The checkpoint's config.json "
                        "does not describe its weights: fix the config or export another checkpoint.") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    problems = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, list(v)[:5]))}"
                         for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k)))
    if problems:
        raise CkptError(f"{cls.__name__}.from_pretrained loads the export only partly ({problems}); it was removed. The "
                        "checkpoint's config.json does not match its weights: fix the config or export another checkpoint.")
    return f"{cls.__name__}.from_pretrained loads it with no missing or unexpected keys" + (_forward(model) if causal else "")


def _forward(model) -> str:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
    if not torch.isfinite(logits).all():
        raise CkptError("The exported model produces non-finite outputs; it was removed. The source checkpoint holds "
                        "non-finite weights (or they overflow the chosen --dtype): try another checkpoint or fp32.")
    return f", forward pass OK (logits {tuple(logits.shape)})"


def _config_json(src: Source, dtype_name: str) -> dict:
    conf = dict(src.model_config)
    if src.trainer == "huggingface":
        conf["dtype"] = dtype_name  # transformers >= 4.56 reads `dtype`, older ones `torch_dtype`
        conf["torch_dtype"] = dtype_name
    return conf


def _export_dir(cfg: Config, step: int, now: Optional[float]) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    dst = cfg.consolidation_dir / f"{stamp}-step{step}"
    n = 2
    while dst.exists():  # two exports within one second
        dst = cfg.consolidation_dir / f"{stamp}-step{step}-{n}"
        n += 1
    return dst


def _apparent_size(path: Path) -> int:
    """Bytes of a checkpoint file or folder (its regular files, links never followed)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            s = os.lstat(os.path.join(dirpath, n))
            total += s.st_size if stat.S_ISREG(s.st_mode) else 0
    return total


def consolidate(cfg: Config, which: str = "latest", average: int = 1, dtype: Optional[str] = None,
                now: Optional[float] = None) -> dict:
    import torch

    dtype = dtype or cfg.consolidation.dtype
    entries = resolve_sources(cfg, which, average)
    sources = [load_source(e) for e in entries]
    src = sources[-1]
    tensors = combine(sources, getattr(torch, DTYPES[dtype]))
    json_files = {"config.json": _config_json(src, DTYPES[dtype])} if src.model_config else {}
    meta = {"format": FORMAT, "source": str(src.entry.path), "layout": src.entry.layout, "trainer": src.trainer,
            "step": src.entry.step, "source_steps": [s.entry.step for s in sources],
            "sources": [str(s.entry.path) for s in sources], "averaged": len(sources), "dtype": dtype,
            "metrics": src.metrics, "notes": src.notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **src.info}
    dst = _export_dir(cfg, src.entry.step, now)
    cfg.consolidation_dir.mkdir(parents=True, exist_ok=True)
    check = write_export(dst, tensors, json_files, src.copy_files, meta, lambda d: verify_export(d, tensors, src))
    full = _apparent_size(src.entry.path)
    size = (dst / MODEL_FILE).stat().st_size
    return {"path": str(dst), "source": str(src.entry.path), "layout": src.entry.layout, "trainer": src.trainer,
            "size": size, "export_size": _apparent_size(dst), "full_checkpoint_size": full, "ratio": size / full,
            "check": check, "source_steps": meta["source_steps"], "dtype": dtype, "notes": src.notes}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


HELP = "export a small weights-only model (safetensors) into consolidated_models/"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--from", dest="source", default="latest", metavar="WHICH",
                    help="latest | best | STEP | PATH of a checkpoint folder or file (default: latest)")
    ap.add_argument("--average", type=number(int, 1, 10_000), default=1, metavar="K",
                    help="average the weights of the last K valid checkpoints")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the export (default: consolidation.dtype)")
    add_json_argument(ap, "what was written")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args))
    try:
        r = consolidate(cfg, args.source, args.average, args.dtype)
    except CkptError:
        raise
    except Exception as exc:  # a crafted checkpoint can make a loader raise anything: still a message, not a traceback
        raise CheckpointError(f"--from {args.source} could not be consolidated ({crash_summary(exc)}); nothing was "
                              "written. The checkpoint is damaged or crafted: pick another one with --from.") from None
    if args.json:
        print(json.dumps({"ok": True, **r}, indent=2))
        return 0
    print(inert(f"wrote {r['path']} from {Path(r['source']).name} ({r['trainer']}, {r['dtype']}, steps {r['source_steps']})"))
    print(f"size {human(r['size'])} vs full checkpoint {human(r['full_checkpoint_size'])} ({r['ratio']:.1%}); {r['check']}")
    for note in r["notes"]:
        print(f"note: {note}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("python -m maintenance.consolidate", __doc__.split("\n\n")[1], add_arguments, run, argv)

if __name__ == "__main__":
    sys.exit(main())
