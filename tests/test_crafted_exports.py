"""compress, consolidate and generate on crafted and damaged files: every one gets a reason, never a
traceback; under --json the one error shape (cliutil.error_json), per file in a batch, and the files
after a bad one are still processed.

Crafted files are fuzzed with hypothesis: torch.save zips whose pickle is mutated (the zip itself stays
valid, so the bytes reach torch's unpickler), whole files mutated, plain torch.save dicts of odd
content (keys, nesting, dtypes), and exports and native checkpoints whose JSON and safetensors headers
are mutated with their checksums recomputed (so they pass verification and reach the parsers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maintenance import compress, consolidate
from tests.helpers import write_config
from trainer import generate

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=list(HealthCheck), derandomize=True)
ERROR_KEYS = {"type", "message", "exit_code"}


def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    """A command's main() in this process: its exit code, stdout and stderr. An exception escaping it (a
    traceback for the user) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------- the seeds
def good_dict() -> dict:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 5, "val_loss": 1.5}


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD = torch_bytes(good_dict())


def with_pickle(zip_bytes: bytes, pkl: bytes) -> bytes:
    """The torch zip with its data.pkl replaced (every CRC right, so only the unpickler sees the damage)."""
    zin = zipfile.ZipFile(io.BytesIO(zip_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for i in zin.infolist():
            zo.writestr(i.filename, pkl if i.filename.endswith("data.pkl") else zin.read(i.filename))
    return out.getvalue()


def pickle_of(zip_bytes: bytes) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(zip_bytes))
    return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def deep_pickle(depth: int = 20000) -> bytes:
    """{"model": [[[...]]] (depth lists), "optimizer": {}}: cheap to unpickle, deep enough for any recursion."""
    return (b"\x80\x02}(X\x05\x00\x00\x00model" + b"]" * depth + b"a" * (depth - 1)
            + b"X\t\x00\x00\x00optimizer}u.")


KNOWN = {  # files met in the wild or built by hand: each must get a reason
    "passwd.pt": Path("/etc/passwd").read_bytes(),
    "empty.pt": b"",
    "memo-on-empty-stack.pt": with_pickle(GOOD, b"\x80\x02\x94."),  # torch's unpickler: IndexError
    "deep.pt": with_pickle(GOOD, deep_pickle()),
    "huge-int-key.pt": with_pickle(GOOD, b"\x80\x02}(\x8a\x08" + b"\xff" * 8 + b"K\x01X\t\x00\x00\x00optimizer}u."),
    "truncated.pt": GOOD[: len(GOOD) // 2],
    # one byte less (requires_grad): a well-formed pickle (the catalog's checks pass) that calls
    # _rebuild_tensor_v2 with an argument missing: TypeError inside torch.load
    "wrong-arguments.pt": with_pickle(GOOD, pickle_of(GOOD).replace(b"\x89", b"", 1)),
}


@st.composite
def mutated(draw, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        if not b:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i : i + draw(st.integers(1, 8))]
        else:
            del b[i:]
    return bytes(b)


KEYS = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.sampled_from(
    ["model", "state_dict", "model_state_dict", "optimizer", "optimizer_state_dict", "config", "model_args",
     "step", "global_step", "val_loss", "epoch", "pytorch-lightning_version", "optimizer_states", "lr_schedulers",
     "hyper_parameters", "scheduler", "_orig_mod.w"]))
TENSORS = st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 3),
                    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8]))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6), TENSORS)
OBJECTS = st.recursive(LEAVES, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(KEYS, c, max_size=4),
                                                   st.tuples(c, c)), max_leaves=12)
ODD_DICTS = st.dictionaries(KEYS, OBJECTS, max_size=6).map(torch_bytes)

CRAFTED_PT = st.one_of(
    st.sampled_from(sorted(KNOWN)).map(KNOWN.__getitem__),
    mutated(pickle_of(GOOD)).map(lambda p: with_pickle(GOOD, p)),
    mutated(GOOD),
    ODD_DICTS,
)


# ------------------------------------------------------------------------------------- compress
def check_compress_batch(crafted: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        bad, good = Path(d) / "a_crafted.pt", Path(d) / "b_good.pt"
        bad.write_bytes(crafted)
        good.write_bytes(GOOD)
        rc, out, _ = run_main(compress.main, ["--json", str(bad), str(good)])
        doc = json.loads(out)
        first, second = doc["files"]
        assert first["file"] == str(bad) and (first["ok"] or set(first["error"]) == ERROR_KEYS)
        assert second == {**second, "file": str(good), "ok": True, "dropped": ["optimizer"]}  # still processed
        assert rc == (0 if first["ok"] else 1) and doc["ok"] == first["ok"]
        assert (Path(d) / "b_good_compressed.pt").exists()
        if not first["ok"]:
            assert bad.read_bytes() == crafted and not (Path(d) / "a_crafted_compressed.pt").exists()


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_compress_gives_each_known_crafted_file_a_reason_and_goes_on(name):
    check_compress_batch(KNOWN[name])


@pytest.mark.slow
@FUZZ
@given(CRAFTED_PT)
def test_compress_fuzz(crafted):
    check_compress_batch(crafted)


# ------------------------------------------------------------------------------------- consolidate
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose checkpoint folder takes single files, and one native checkpoint of the built-in model."""
    from ckpt_daemon.checkpoint import CheckpointManager
    from ckpt_daemon.models.gpt import GPT, GPTConfig

    root = tmp_path_factory.mktemp("proj")
    cfg = write_config(root, {"checkpoints": {"pattern": ["model_step_{step}.pt", "checkpoint-{step}"]}}, tiny=False)
    torch.manual_seed(0)
    mc = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    CheckpointManager(root / "native").save(3, model=GPT(mc), config={"model": mc.to_dict(), "vocab": list("abcdefghijk")})
    return cfg, root / "native" / "checkpoint-3"


def check_consolidate(cfg: Path, argv: list[str]) -> None:
    rc, out, err = run_main(consolidate.main, ["--config", str(cfg), *argv, "--json"])
    doc = json.loads(out)
    if doc["ok"]:
        assert rc == 0 and Path(doc["path"]).is_dir()
    else:
        assert set(doc) == {"ok", "error"} and set(doc["error"]) == ERROR_KEYS and rc == doc["error"]["exit_code"] != 0


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_consolidate_from_a_step_gives_each_known_crafted_file_a_reason(project, name):
    cfg, _ = project
    p = cfg.parent / "checkpoints" / "model_step_5.pt"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(KNOWN[name])
    try:
        check_consolidate(cfg, ["--from", "5"])
    finally:
        p.unlink()


@FUZZ
@given(CRAFTED_PT)
def test_consolidate_fuzz(project, crafted):
    cfg, _ = project
    p = cfg.parent / "checkpoints" / "model_step_5.pt"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(crafted)
    try:
        check_consolidate(cfg, ["--from", "5"])
        check_consolidate(cfg, ["--from", str(p)])
    finally:
        p.unlink()


# ---------------------------------------------- native checkpoints and exports, checksums recomputed
def sha(b: bytes) -> dict:
    return {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                    max_leaves=10)


@st.composite
def crafted_native(draw, src: Path) -> dict[str, bytes]:
    """The files of a native checkpoint with state.json, the model's safetensors header or the model config
    crafted, and a manifest whose checksums match them."""
    files = {n: (src / n).read_bytes() for n in os.listdir(src) if n != "manifest.json"}
    what = draw(st.sampled_from(["state.json", "header", "config"]))
    if what == "state.json":
        files["state.json"] = draw(st.one_of(mutated(files["state.json"]), JSON.map(lambda v: json.dumps(v).encode())))
    elif what == "header":
        b = files["model.safetensors"]
        n = int.from_bytes(b[:8], "little")
        header = draw(mutated(b[8 : 8 + n]))
        files["model.safetensors"] = len(header).to_bytes(8, "little") + header + b[8 + n :]
    else:
        state = json.loads(files["state.json"])
        model = dict(state["config"]["model"])
        model[draw(st.sampled_from(sorted(model)))] = draw(st.one_of(JSON, st.integers(-10, 10**12)))
        state["config"] = {**state["config"], "model": draw(st.one_of(st.just(model), JSON))}
        files["state.json"] = json.dumps(state).encode()
    m = json.loads((src / "manifest.json").read_text())
    m["files"] = {n: sha(b) for n, b in files.items()}
    m.pop("digest", None)
    m.pop("manifest_digest", None)
    m.pop("self_digest", None)  # what a manifest written before the seal looks like
    return {**files, "manifest.json": json.dumps(m).encode()}


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for n, b in files.items():
        (folder / n).write_bytes(b)


@FUZZ
@given(st.data())
def test_consolidate_and_generate_on_crafted_native_checkpoints(project, data):
    cfg, native = project
    folder = cfg.parent / "checkpoints" / "checkpoint-7"
    write_folder(folder, data.draw(crafted_native(native)))
    try:
        check_consolidate(cfg, ["--from", "7"])
        rc, out, err = run_main(generate.main, ["--checkpoint", str(folder), "--prompt", "abc", "--tokens", "3"])
        assert rc == 0 or err.startswith("error: ")
    finally:
        shutil.rmtree(folder)


@st.composite
def crafted_export(draw, src: Path) -> dict[str, bytes]:
    """An export folder (model.safetensors + metadata.json) with either file crafted; the metadata's
    checksum of the weights matches them unless metadata.json itself is the crafted one."""
    from ckpt_daemon.checkpoint import read_checkpoint

    st_ = read_checkpoint(src)
    weights = (src / "model.safetensors").read_bytes()
    meta = {"config": st_["config"], "step": 3}
    what = draw(st.sampled_from(["weights", "metadata", "config"]))
    if what == "weights":
        weights = draw(mutated(weights))
    elif what == "config":
        meta["config"] = draw(st.one_of(JSON, st.builds(lambda m: {**st_["config"], "model": m}, JSON),
                                        st.builds(lambda v: {**st_["config"], "vocab": v}, JSON)))
    meta["files"] = {"model.safetensors": sha(weights)}
    data = json.dumps(meta).encode()
    if what == "metadata":
        data = draw(st.one_of(mutated(data), JSON.map(lambda v: json.dumps(v).encode())))
    return {"model.safetensors": weights, "metadata.json": data}


@FUZZ
@given(st.data())
def test_generate_on_crafted_exports(project, tmp_path_factory, data):
    _, native = project
    folder = tmp_path_factory.getbasetemp() / "export"
    write_folder(folder, data.draw(crafted_export(native)))
    for prompt in (["--prompt", "abc"], ["--prompt-ids", "1,2"]):
        rc, out, err = run_main(generate.main, ["--checkpoint", str(folder), *prompt, "--tokens", "3"])
        assert rc == 0 or err.startswith("error: ")


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_generate_on_a_crafted_file_says_why(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(KNOWN[name])
    rc, out, err = run_main(generate.main, ["--checkpoint", str(p), "--prompt", "abc"])
    assert rc != 0 and err.startswith("error: ") and "consolidate" in err


def test_the_unmodified_seeds_work(project, tmp_path):
    """The fuzz starts from files that work: a failure above is the crafting's doing."""
    cfg, native = project
    check_compress_batch(GOOD)
    rc, out, _ = run_main(generate.main, ["--checkpoint", str(native), "--prompt", "abc", "--tokens", "3"])
    assert rc == 0 and out.startswith("abc")
    rc, out, _ = run_main(consolidate.main, ["--config", str(cfg), "--from", str(native), "--json"])
    assert rc == 0 and json.loads(out)["ok"]
