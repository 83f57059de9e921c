from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.config_docs import config_reference
from tuneloop.config_file import apply_override, load_config
from tuneloop.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_defaults_and_quickstart_are_valid() -> None:
    config = load_config(REPO / "examples" / "quickstart.yaml")
    assert config.model.base == "smollm2-135m-instruct"
    assert config.data.sources[0].path == "builtin:extraction"
    assert load_config(None).data.val_fraction == 0.1


def test_unknown_key_names_the_field_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  val_fracton: 0.2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "data.val_fracton: unknown key" in error.value.message
    assert "did you mean 'val_fraction'" in error.value.message
    assert error.value.hint


def test_wrong_type_names_the_field_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - path: a.jsonl\n      limit: many\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "data.sources.0.limit" in error.value.message
    assert "'many'" in error.value.message


def test_lora_rank_zero_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"train.lora.r"):
        load_config(None, ["train.lora.r=0"])


def test_overrides_parse_yaml_values_and_list_indices(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - path: a.jsonl\n")
    config = load_config(
        path,
        [
            "data.val_fraction=0.25",
            "data.packing=true",
            "data.sources.0.format=alpaca",
            "data.sources.1.path=b.csv",
            "train.lora.target_modules=[q_proj, v_proj]",
        ],
    )
    assert config.data.val_fraction == 0.25
    assert config.data.packing is True
    assert config.data.sources[0].format == "alpaca"
    assert config.data.sources[1].path == "b.csv"
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    # relative source paths resolve against the config file's folder
    assert config.resolve_path("a.jsonl") == (tmp_path / "a.jsonl").resolve()


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="--set"):
        apply_override({}, "no-equals-sign")
    with pytest.raises(ConfigError, match="out of range"):
        apply_override({"data": {"sources": []}}, "data.sources.3.path=x")


def test_cli_validate_and_schema(tmp_path: Path) -> None:
    good = runner.invoke(app, ["config", "validate", str(REPO / "examples" / "quickstart.yaml"), "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["valid"] is True
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("trian: {}\n")
    bad = runner.invoke(app, ["config", "validate", str(bad_file), "--json"])
    assert bad.exit_code == 2
    payload = json.loads(bad.stdout)
    assert "trian: unknown key" in payload["error"] and "did you mean 'train'" in payload["error"]
    schema = runner.invoke(app, ["config", "schema"])
    assert schema.exit_code == 0
    properties = json.loads(schema.stdout)["properties"]
    assert {"project", "model", "data", "train", "eval", "registry", "serve"} <= set(properties)


def test_docs_config_md_is_generated_from_the_model() -> None:
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == config_reference(), "docs/config.md is stale: run `tuneloop config docs > docs/config.md`"
