"""The architecture's import rules (docs/ARCHITECTURE.md) hold: import-linter's contracts in
pyproject.toml ([tool.importlinter]: layers, no cycles within a package, the model and the data
pipeline free of distribution), plus the one rule import-linter cannot state (a submodule of an
external package): the model never imports torch.distributed."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    kept = re.findall(r"^(.*) (KEPT|BROKEN)$", proc.stdout, re.M)
    assert proc.returncode == 0 and kept and all(v == "KEPT" for _, v in kept), proc.stdout[-4000:] + proc.stderr
    assert len(kept) >= 5, kept  # every contract of pyproject.toml was checked


def test_the_model_never_imports_torch_distributed():
    for path in (ROOT / "pretrain" / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("torch.distributed") for n in names), f"{path} imports {names}"
