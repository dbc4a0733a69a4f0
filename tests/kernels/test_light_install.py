"""The light install: ``pip install ptd`` brings torch, triton and numpy, and the kernel library
needs nothing else — the trainer's packages (transformers, matplotlib, tqdm, pillow) and the peers
and test tools (liger-kernel, TRL, cut-cross-entropy) live in extras."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # imports the library in fresh interpreters without the extras

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
CORE = {"torch", "triton", "numpy"}
# Packages only an extra installs; the kernel library must import without any of them.
EXTRAS_ONLY = ["transformers", "tokenizers", "matplotlib", "tqdm", "PIL", "liger_kernel", "trl", "accelerate",
               "datasets", "cut_cross_entropy", "packaging"]
# Submodules that are about another framework and import it on purpose (their own extra).
FRAMEWORK_MODULES = {"hf.py", "trl.py", "verl.py"}


def _top_level_imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_kernel_library_imports_only_its_dependencies():
    """Every import in ptd_kernels (outside the framework integrations) is the standard library,
    ptd_kernels itself, or a declared dependency; and the declared dependencies are exactly those."""
    found = {}
    for folder, _dirs, files in os.walk(os.path.join(ROOT, "ptd_kernels")):
        for name in files:
            if not name.endswith(".py") or (os.path.basename(folder) == "integrations" and name in FRAMEWORK_MODULES):
                continue
            path = os.path.join(folder, name)
            for module in _top_level_imports(path) - set(sys.stdlib_module_names) - {"ptd_kernels", "__future__"}:
                found.setdefault(module, []).append(os.path.relpath(path, ROOT))
    stray = {module: where for module, where in found.items() if module not in CORE}
    assert not stray, f"ptd_kernels imports packages outside torch/triton/numpy: {stray}"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert declared == CORE, f"pyproject's dependencies {sorted(declared)} are not the kernel library's {sorted(CORE)}"
    extras = project["optional-dependencies"]
    # the README's set-up command installs the trainer and every test tool
    assert "ptd[train]" in extras["dev"] and "ptd[trl]" in extras["dev"] and "ptd[hf]" in extras["train"]
    for tool in ("pytest", "pytest-benchmark", "hypothesis", "ruff", "liger-kernel"):
        assert any(dep.startswith(tool) for dep in extras["dev"]), tool


# As if not installed: importing any of them fails, and importlib.util.find_spec reports it absent.
BLOCKER = f"""
import sys
BLOCKED = {EXTRAS_ONLY!r}
sys.modules.update(dict.fromkeys(BLOCKED))
"""

USE = """
import torch
import ptd_kernels as ptd
from ptd_kernels.integrations import verl

hidden, weight = torch.randn(5, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
targets = torch.tensor([1, 2, 3, 4, -100])
logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True)
terms = ptd.linear_ptd_terms(hidden, weight, targets, torch.randn(5, 16), torch.randn(300, 16), k=8)
(logp.sum() + terms.jsd.sum()).backward()
verl.FusedLinearForPPO()(hidden.detach()[None], weight.detach(), targets.clamp(min=0)[None])
loaded = sorted(m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None)
assert not loaded, loaded
print("ok", float(logp[0]), weight.grad.shape)
"""


def test_import_and_use_without_the_extras():
    """In a fresh interpreter where every extra's package fails to import, ptd_kernels imports,
    computes and differentiates (torch backend; the Triton kernels need only triton)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", BLOCKER + USE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok ")


def test_blocker_blocks():
    """The hook of the test above does block: importing the trainer under it fails."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import ptd_train.model"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "import of transformers halted" in done.stderr
