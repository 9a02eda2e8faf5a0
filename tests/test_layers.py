"""The import rules of the house, checked on the source (every import statement, function-local
ones included): contracts <- data <- eval <- feedback / runtime <- tasks, the cores <- app.

    contracts   the modules at ppo_rlhf's top (config, rollout, rewards, errors, tokens, backend,
                ...): import only each other
    data        record formats and encoding: contracts only
    eval        evaluation numbers: contracts, data
    runtime     the host runtime: contracts, data, eval (never the feedback tools, never a task)
    feedback    labelling tools: contracts, data, eval
    tasks       problem domains: contracts, data, eval, feedback
    ppo_jax, ppo_torch   the cores: contracts, data, eval, runtime; never each other, never app
    app         the CLI: anything but the cores, which it reaches through
                `app.backends.get_backend` (importlib, by name) -- and no `backend == "jax"`
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("data", "eval", "runtime", "feedback", "tasks", "app")
ALLOWED = {
    "contracts": {"contracts"},
    "data": {"contracts"},
    "eval": {"contracts", "data"},
    "runtime": {"contracts", "data", "eval"},
    "feedback": {"contracts", "data", "eval"},
    "tasks": {"contracts", "data", "eval", "feedback"},
    "ppo_jax": {"contracts", "data", "eval", "runtime"},
    "ppo_torch": {"contracts", "data", "eval", "runtime"},
    "app": {"contracts", "data", "eval", "runtime", "feedback", "tasks"},
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("ppo_jax", "ppo_torch"):
        return parts[0]
    if parts[0] != "ppo_rlhf":
        return None  # the standard library and third parties
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) > 1 and parts[1] == "__main__":
        return "app"  # `python -m ppo_rlhf` is the CLI
    return "contracts"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file; `from a import b` gives a.b too (b may
    be a module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package in ("ppo_rlhf", "ppo_jax", "ppo_torch"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            src = layer_of(module)
            seen = set()
            for line, target in imports(path):
                dst = layer_of(target)
                if dst is not None and dst != src and dst not in ALLOWED[src] and line not in seen:
                    seen.add(line)  # one report per statement
                    found.append(f"{rel}:{line}: {src} imports {target} ({dst})")
    return found


def test_every_import_follows_the_layers():
    assert violations() == []


def test_the_app_never_branches_on_a_backend_name():
    pattern = re.compile(r"""backend\s*[!=]=\s*["'](jax|torch)["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "ppo_rlhf" / "app").rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("leak", [
    ("ppo_rlhf/data/jsonl.py", "from ppo_rlhf.runtime import seeds\n"),
    ("ppo_rlhf/runtime/supervised.py", "def f():\n    from ppo_rlhf.feedback.labeller import noise_ceiling\n"),
    ("ppo_rlhf/app/train.py", "def f():\n    from ppo_torch.parallel import shutdown\n"),
    ("ppo_jax/ppo.py", "import ppo_torch.losses\n"),
    ("ppo_torch/losses.py", "from ppo_rlhf.app import backends\n"),
])
def test_a_planted_leak_is_found(leak, tmp_path):
    """The checker sees each kind of leak the house once had (a copy of the tree with one
    planted: data importing runtime, a function-local import of the labeller in runtime, the app
    importing a core, a core importing the other, a core importing the app)."""
    import shutil

    for package in ("ppo_rlhf", "ppo_jax", "ppo_torch"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    rel, code = leak
    with open(tmp_path / rel, "a", encoding="utf-8") as f:
        f.write("\n" + code)
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(rel), found
