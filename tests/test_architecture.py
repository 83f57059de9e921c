"""Layer rules (docs/architecture.md), enforced: import-linter's contracts from pyproject.toml, and the light
import paths that must stay light (the registry and its CLI load neither torch nor Transformers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and ", 0 broken" in result.stdout


def heavy_modules_after(code: str, workspace: Path) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)))"
    )
    env = {"TUNELOOP_HOME": str(workspace), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_registry_loads_no_torch_or_transformers(tmp_path: Path) -> None:
    code = "import tuneloop.registry, tuneloop.registry.store, tuneloop.registry.versions, tuneloop.registry.refs"
    assert heavy_modules_after(code, tmp_path) == []


def test_registry_list_loads_no_torch_or_transformers(tmp_path: Path) -> None:
    code = (
        "from typer.testing import CliRunner\nfrom tuneloop.cli import app\n"
        "result = CliRunner().invoke(app, ['registry', 'list', '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    assert heavy_modules_after(code, tmp_path) == []
