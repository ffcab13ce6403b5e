"""Consolidation, compression and generation from every layout users bring: ckpt-daemon's own
checkpoints, real Hugging Face Trainer folders, real Lightning .ckpt files and plain torch.save scripts
(nanoGPT-style and `{model_state_dict, optimizer_state_dict}`). Small CPU models, no downloads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from ckpt_daemon.checkpoint import load_weights
from ckpt_daemon.config import load_config
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import commit as store_commit
from maintenance import compress, consolidate
from tests.helpers import run_py, same_nested, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network


def export(capsys, cfg: Path, *args: str) -> dict:
    """`python -m maintenance.consolidate ... --json`, in this process (the CLI's own main)."""
    capsys.readouterr()
    rc = consolidate.main(["--config", str(cfg), "--json", *args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def refused(capsys, main, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def stored_names(folder: Path) -> set[str]:
    with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def assert_bits(got: dict, want: dict, dtype=None) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# ------------------------------------------------------------------------------ the four layouts
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A real transformers.Trainer run saving checkpoint-2/ and checkpoint-4/, tokenizer included."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    cfg = write_config(root, {"checkpoints": {"pattern": ["checkpoint-{step}"]}}, tiny=False)
    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(93)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=None, eos_token_id=None))
    data = torch.randint(0, 100, (16, 16), generator=torch.Generator().manual_seed(0))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    args = transformers.TrainingArguments(
        output_dir=str(root / "checkpoints"), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=2, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(), processing_class=tok).train()
    ck = root / "checkpoints"
    return SimpleNamespace(
        root=root, cfg=cfg, steps=[2, 4], path=lambda s: ck / f"checkpoint-{s}",
        weights=lambda s: safetensors.torch.load_file(str(ck / f"checkpoint-{s}" / "model.safetensors")))


def _lightning_module():
    L = pytest.importorskip("lightning")

    class LitRegressor(L.LightningModule):
        def __init__(self, hidden: int = 256, lr: float = 0.01):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    return L, LitRegressor


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """A real Lightning run whose ModelCheckpoint writes epoch=0-step=4.ckpt and epoch=1-step=8.ckpt."""
    L, Lit = _lightning_module()
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("lightning")
    cfg = write_config(root, {"checkpoints": {"pattern": ["epoch={epoch}-step={step}.ckpt"]}}, tiny=False)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 32, generator=g), torch.randn(32, 1, generator=g))
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=4, save_top_k=-1)])
    trainer.fit(Lit(), torch.utils.data.DataLoader(data, batch_size=8))
    ck = root / "checkpoints"
    names = {4: "epoch=0-step=4.ckpt", 8: "epoch=1-step=8.ckpt"}
    assert sorted(p.name for p in ck.glob("*.ckpt")) == sorted(names.values())
    return SimpleNamespace(root=root, cfg=cfg, steps=[4, 8], path=lambda s: ck / names[s], module=Lit,
                           weights=lambda s: torch.load(ck / names[s], weights_only=True)["state_dict"])


class TinyLM(torch.nn.Module):
    """nanoGPT's shape in miniature: embeddings tied to the output head."""

    def __init__(self, vocab_size=100, n_embd=32):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab_size, n_embd)
        self.mlp = torch.nn.Linear(n_embd, n_embd)
        self.head = torch.nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        return self.head(torch.relu(self.mlp(self.wte(idx))))


def _train_and_save(root: Path, pattern: str, build, save) -> SimpleNamespace:
    cfg = write_config(root, {"checkpoints": {"pattern": [pattern]}}, tiny=False)
    (root / "checkpoints").mkdir()
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (10, 20):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randint(0, 100, (4, 8))).float().pow(2).mean().backward()
            opt.step()
        save(model, opt, step, root / "checkpoints" / pattern.format(step=step))
    return SimpleNamespace(root=root, cfg=cfg, steps=[10, 20], path=lambda s: root / "checkpoints" / pattern.format(step=s))


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    """nanoGPT's train.py checkpoint: model (compiled: `_orig_mod.` names), optimizer, model_args, iter_num..."""
    model_args = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 8, "bias": False, "vocab_size": 100, "dropout": 0.0}

    def save(model, opt, step, path):
        sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # what torch.compile'd models save
        torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": step,
                    "best_val_loss": torch.tensor(3.0 - step / 100), "config": {"batch_size": 4, "compile": True}},
                   path)

    p = _train_and_save(tmp_path_factory.mktemp("nanogpt"), "model_step_{step}.pt", TinyLM, save)
    p.model_args = model_args
    p.weights = lambda s: {k.removeprefix("_orig_mod."): v for k,
                           v in torch.load(p.path(s), weights_only=True)["model"].items()}
    return p


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The most common script: torch.save({'model_state_dict', 'optimizer_state_dict', 'step', 'loss'})."""

    def build():
        return torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))

    def save(model, opt, step, path):
        torch.save({"step": step, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                    "loss": 1.0 / step}, path)

    p = _train_and_save(tmp_path_factory.mktemp("plain"), "model_step_{step}.pt", build, save)
    p.weights = lambda s: torch.load(p.path(s), weights_only=True)["model_state_dict"]
    return p


LAYOUTS = ["hf", "lightning", "nanogpt", "plain"]
TRAINER = {"hf": "huggingface", "lightning": "lightning", "nanogpt": "torch.save", "plain": "torch.save"}


# ------------------------------------------------------------------------------------ consolidate
@pytest.mark.slow
@pytest.mark.parametrize("kind", LAYOUTS)
def test_consolidate_fp32_and_bf16_from_every_layout(kind, request, capsys):
    p = request.getfixturevalue(kind)
    last = p.steps[-1]
    fp32 = export(capsys, p.cfg, "--from", "latest", "--dtype", "fp32")
    bf16 = export(capsys, p.cfg, "--from", str(last), "--dtype", "bf16")
    src = p.weights(last)
    got, meta = load_weights(Path(fp32["path"]))
    assert_bits(got, src)  # the weights a user loads are the checkpoint's, bit for bit
    assert_bits(load_weights(Path(bf16["path"]))[0], src, torch.bfloat16)
    assert Path(fp32["path"]).parent == p.root / "consolidated_models" and fp32["path"].endswith(f"-step{last}")
    assert meta["trainer"] == TRAINER[kind] and meta["source_steps"] == [last] and meta["dtype"] == "fp32"
    assert meta["source"] == str(p.path(last)) and len(meta["files"]["model.safetensors"]["sha256"]) == 64
    # no optimizer: far smaller than the full checkpoint; bf16 about half of fp32
    assert fp32["size"] < 0.5 * fp32["full_checkpoint_size"]
    assert 0.45 < bf16["size"] / fp32["size"] < 0.56
    assert not list((p.root / "consolidated_models" / ".ckpt-daemon" / "tmp").iterdir())  # no scratch left


def test_an_export_killed_half_way_never_looks_done_and_is_cleaned(plain, tmp_path, capsys, monkeypatch):

    cfg = write_config(tmp_path, {"checkpoints": {"dir": str(plain.root / "checkpoints"),
                                                  "pattern": ["model_step_{step}.pt"]}}, tiny=False)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(consolidate, "verify_export", killed)
    assert consolidate.main(["--config", str(cfg)]) == 130  # Ctrl+C: exit 130, no traceback
    out = tmp_path / "consolidated_models"
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # nothing under a real name
    stale = store_commit.Scratch(out, "export-x")  # a writer killed -9: its scratch folder stays, its lock goes
    (stale.path / "model.safetensors").write_bytes(b"x" * 100)
    os.close(stale.fd)
    stale.fd = None
    foreign_tmp = out / ".tmp-20260101_000000-step20-999999999"  # not ours: never touched
    foreign_tmp.mkdir()
    monkeypatch.undo()
    from maintenance.cleanup import finish_leftovers

    lines = finish_leftovers(load_config(cfg))  # what the next job of any kind does
    assert any("export-x" in line for line in lines) and not stale.path.exists()
    r = export(capsys, cfg)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [Path(r["path"]).name]
    assert foreign_tmp.is_dir()


@pytest.mark.slow
def test_hf_export_loads_with_transformers_and_generates(hf, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    fp32 = export(capsys, hf.cfg, "--dtype", "fp32")
    bf16 = export(capsys, hf.cfg, "--dtype", "bf16")
    assert "AutoModelForCausalLM.from_pretrained loads it" in bf16["check"]
    for r, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        out = Path(r["path"])
        assert {"config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
        assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                                        output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert next(model.parameters()).dtype == dtype
    # the fp32 export computes exactly what the checkpoint computes
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    a = transformers.AutoModelForCausalLM.from_pretrained(hf.path(4), local_files_only=True).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(fp32["path"], local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # generation, from text with the tokenizer that came along ...
    r = run_py(["-m", "trainer.generate", "--checkpoint", bf16["path"], "--prompt", "the cat", "--tokens", "6"],
               check=True)
    words = r.stdout.split()
    assert words[:2] == ["the", "cat"] and len(words) == 8, r.stdout
    # ... and from token ids when the folder has no tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(fp32["path"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    from trainer import generate

    rc, err = refused(capsys, generate.main, ["--checkpoint", str(bare), "--prompt", "the cat"])
    assert rc == 2 and "--prompt-ids" in err
    assert generate.main(["--checkpoint", str(bare), "--prompt-ids", "1,2,3", "--tokens", "5"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 8 and all(0 <= i < 100 for i in ids)


@pytest.mark.slow
@pytest.mark.parametrize("kind", LAYOUTS)
def test_average_2_is_the_mean_of_the_two_checkpoints(kind, request, capsys):
    p = request.getfixturevalue(kind)
    r = export(capsys, p.cfg, "--average", "2", "--dtype", "fp32")
    assert r["source_steps"] == p.steps
    a, b = (p.weights(s) for s in p.steps)
    got, meta = load_weights(Path(r["path"]))
    assert meta["averaged"] == 2 and set(got) == set(b)
    floats = [k for k in b if b[k].is_floating_point()]
    assert any(not torch.equal(a[k], b[k]) for k in floats)  # the two really differ
    for k in floats:
        assert torch.equal(got[k], ((a[k].double() + b[k].double()) / 2).float()), k


def test_average_refuses_checkpoints_of_different_models(tmp_path, capsys):
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"]}}, tiny=False)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model_state_dict": torch.nn.Linear(4, 4).state_dict()}, tmp_path / "checkpoints" / "model_step_1.pt")
    torch.save({"model_state_dict": torch.nn.Linear(4, 5).state_dict()}, tmp_path / "checkpoints" / "model_step_2.pt")
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg), "--average", "2"])
    assert rc == 1 and "cannot be averaged" in err and "model_step_1.pt" in err
    torch.save({"model_state_dict": torch.nn.Linear(5, 5, bias=False).state_dict()},
               tmp_path / "checkpoints" / "model_step_3.pt")
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg), "--average", "2"])
    assert rc == 1 and "different sets of tensors" in err and "'bias'" in err
    assert not (tmp_path / "consolidated_models").exists() or not os.listdir(tmp_path / "consolidated_models")


def test_nanogpt_export_keeps_its_config_drops_the_compile_prefix_and_ties(nanogpt, capsys):
    r = export(capsys, nanogpt.cfg, "--dtype", "fp32")
    out = Path(r["path"])
    assert json.loads((out / "config.json").read_text()) == nanogpt.model_args
    got, meta = load_weights(out)
    assert sorted(got) == ["head.weight", "mlp.bias", "mlp.weight", "wte.weight"]
    assert stored_names(out) == {"mlp.bias", "mlp.weight", "wte.weight"}  # the tied head is stored once
    model = TinyLM()
    model.load_state_dict(got)
    assert model.head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert meta["metrics"]["best_val_loss"] == pytest.approx(2.8)
    assert any("_orig_mod." in n for n in meta["notes"])


def test_lightning_export_keeps_the_state_dict_names_for_the_module(lightning, capsys):
    r = export(capsys, lightning.cfg, "--from", str(lightning.path(8)))
    got, meta = load_weights(Path(r["path"]))
    assert sorted(got) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert meta["hyper_parameters"] == {"hidden": 256, "lr": 0.01} and meta["lightning"]["global_step"] == 8
    module = lightning.module(**meta["hyper_parameters"])
    module.load_state_dict(got)  # strict: every name fits the LightningModule
    original = lightning.module.load_from_checkpoint(lightning.path(8))
    x = torch.randn(3, 32)
    assert torch.equal(module(x), original(x))


def test_hf_checkpoint_with_pytorch_model_bin_from_a_path(hf, tmp_path, capsys):
    """Trainer(save_safetensors=False) writes pytorch_model.bin, with the tied lm_head saved too."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "elsewhere" / "checkpoint-4"
    shutil.copytree(hf.path(4), folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    r = export(capsys, hf.cfg, "--from", str(folder), "--dtype", "bf16")
    assert r["source_steps"] == [4] and "no missing or unexpected keys" in r["check"]
    out = Path(r["path"])
    assert "lm_head.weight" not in stored_names(out)  # tied to the embeddings: stored once
    assert_bits(load_weights(out)[0], model.state_dict(), torch.bfloat16)


def test_consolidate_refuses_damage_and_missing_best(hf, tmp_path, capsys):
    root = tmp_path / "proj"
    shutil.copytree(hf.root / "checkpoints", root / "checkpoints", ignore=shutil.ignore_patterns(".ckpt-daemon"))
    cfg = write_config(root, {"checkpoints": {"pattern": ["checkpoint-{step}"]}}, tiny=False)
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg), "--from", "best"])
    assert rc == 6 and "no best checkpoint" in err
    opt = root / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside a stored tensor
    opt.write_bytes(bytes(data))
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg), "--from", "4"])
    assert rc != 0 and "checkpoint-4" in err and "Traceback" not in err
    assert not (root / "consolidated_models").exists() or not os.listdir(root / "consolidated_models")


class _Evil:
    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_files_that_need_unpickling_are_refused_and_left_untouched(tmp_path, capsys):
    mark = tmp_path / "PWNED"
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"]}}, tiny=False)
    (tmp_path / "checkpoints").mkdir()
    f = tmp_path / "checkpoints" / "model_step_7.pt"
    m = torch.nn.Linear(8, 8)
    torch.save({"model_state_dict": m.state_dict(),
                "optimizer_state_dict": torch.optim.SGD(m.parameters()).state_dict(),
                "evil": _Evil(str(mark))}, f)
    before = f.read_bytes()
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg), "--from", "7"])
    assert rc == 1 and f"{f} cannot be loaded safely" in err and "posix.system" in err and "weights_only=True" in err
    rc, err = refused(capsys, compress.main, [str(f.parent / "*.pt"), "--replace"])
    assert rc == 1 and f"{f} cannot be loaded safely" in err
    assert f.read_bytes() == before and not mark.exists()
    assert sorted(p.name for p in f.parent.iterdir()) == ["model_step_7.pt"]
    assert not (tmp_path / "consolidated_models").exists() or not os.listdir(tmp_path / "consolidated_models")


# --------------------------------------------------------------------------------------- compress
DROPPED = {"lightning": {"optimizer_states", "lr_schedulers"}, "nanogpt": {"optimizer"},
           "plain": {"optimizer_state_dict"}}


@pytest.mark.parametrize("kind", ["lightning", "nanogpt", "plain"])
def test_compress_drops_the_optimizer_and_keeps_everything_else(kind, request, tmp_path, capsys):
    p = request.getfixturevalue(kind)
    src = tmp_path / p.path(p.steps[-1]).name
    shutil.copy2(p.path(p.steps[-1]), src)
    original = src.read_bytes()
    full = torch.load(src, weights_only=True)
    assert compress.main([str(tmp_path / f"*{src.suffix}")]) == 0
    out = src.with_name(f"{src.stem}_compressed{src.suffix}")
    assert "verified" in capsys.readouterr().out and src.read_bytes() == original
    small = torch.load(out, weights_only=True)
    assert set(full) - set(small) == DROPPED[kind]
    assert same_nested(small, {k: v for k, v in full.items() if k not in DROPPED[kind]})  # weights bit-identical
    assert out.stat().st_size < 0.4 * len(original)  # AdamW's two moments were two thirds of it
    # the copy is not taken for a checkpoint (its name matches no pattern)
    c = cat.scan(tmp_path, load_config(p.cfg).checkpoints.pattern)
    assert [e.name for e in c.entries] == [src.name]
    assert compress.main([str(src), "--replace"]) == 0
    assert same_nested(torch.load(src, weights_only=True), small)
    if kind == "lightning":  # the module still loads from it
        module = p.module.load_from_checkpoint(src)
        assert same_nested(dict(module.state_dict()), dict(full["state_dict"]))


def test_compress_leaves_files_with_nothing_to_drop_alone(tmp_path, capsys):
    raw = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 4).state_dict(), raw)
    safetensors.torch.save_file({"w": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert compress.main([str(raw), str(tmp_path / "w.safetensors"), "--replace"]) == 0
    out = capsys.readouterr().out
    assert out.count("nothing to drop") == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------- ckpt-daemon's own
@pytest.mark.slow
def test_consolidate_sizes_loadability_and_average(tmp_path, capsys):
    cfg_path = write_config(tmp_path,
                            {"trainer": {"model": {"n_embd": 64, "n_head": 2, "n_layer": 2, "block_size": 32}}})
    run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "15"], check=True)
    fp32 = export(capsys, cfg_path, "--from", "latest")
    assert fp32["source_steps"] == [15] and "forward pass OK" in fp32["check"]
    assert 0.30 < fp32["ratio"] < 0.37  # weights are a third of a full AdamW checkpoint
    bf16 = export(capsys, cfg_path, "--from", "15", "--dtype", "bf16")
    assert 0.15 < bf16["ratio"] < 0.19  # and a sixth in bf16
    out = Path(fp32["path"])
    assert out.parent == tmp_path / "consolidated_models" and out.name.endswith("-step15")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["source_steps"] == [15] and meta["files"]["model.safetensors"]["sha256"]
    assert json.loads((out / "config.json").read_text())["n_embd"] == 64
    # --average K equals the mean of the K checkpoints' tensors
    avg = export(capsys, cfg_path, "--average", "3")
    assert avg["source_steps"] == [5, 10, 15]
    from ckpt_daemon.checkpoint import read_checkpoint

    got, _ = load_weights(Path(avg["path"]))
    srcs = [read_checkpoint(tmp_path / "checkpoints" / f"checkpoint-{s}")["model"] for s in (5, 10, 15)]
    for k, v in got.items():
        expect = (srcs[0][k].double() + srcs[1][k].double() + srcs[2][k].double()) / 3
        assert torch.equal(v, expect.float()), k
    rc, err = refused(capsys, consolidate.main, ["--config", str(cfg_path), "--average", "9"])
    assert rc == 2 and "needs 9 valid" in err
    # the CLI itself, as users and the daemon's jobs run it
    r = run_py(["-m", "maintenance.consolidate", "--config", str(cfg_path), "--from", "10", "--dtype", "fp16"],
               check=True)
    assert r.stdout.startswith(f"wrote {tmp_path / 'consolidated_models'}") and "forward pass OK" in r.stdout
