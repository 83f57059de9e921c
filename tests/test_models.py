from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.errors import ModelResolutionError
from tuneloop.models import load_tokenizer, materialize, resolve_base
from tuneloop.workspace import Workspace

runner = CliRunner()


def test_local_folder_resolves(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref = resolve_base(str(tiny_model_dir), Workspace(tmp_path))
    assert ref.kind == "folder" and materialize(ref) == tiny_model_dir
    assert load_tokenizer(ref).chat_template


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("./no/such/folder", "no such file or folder"),
        ("weights.gguf", "no such file or folder"),
        ("not a model!", "not a bundled alias, a local path or a hub id"),
    ],
)
def test_unknown_models_fail_with_alternatives(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_base(spec, Workspace(tmp_path))
    assert message in error.value.message
    assert "smollm2-135m-instruct" in (error.value.hint or "")


def test_gguf_file_and_config_relative_paths(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.config_file import load_config
    from tuneloop.models import bundled_gguf_path

    gguf = bundled_gguf_path("smollm2-135m-instruct")
    ref = resolve_base(str(gguf), Workspace(tmp_path))
    assert ref.kind == "gguf" and ref.gguf_path == gguf and ref.folder.parent == tmp_path / "models"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "template.jinja").write_text("{{ messages }}")
    (tmp_path / "cfg" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "cfg" / "c.yaml").write_text("model:\n  base: model\n  chat_template: template.jinja\n")
    config = load_config(tmp_path / "cfg" / "c.yaml")
    assert config.base_model_spec() == str((tmp_path / "cfg" / "model").resolve())
    assert config.chat_template_spec() == str(tmp_path / "cfg" / "template.jinja")
    tokenizer = load_tokenizer(resolve_base(config.base_model_spec(), Workspace(tmp_path)), config.chat_template_spec())
    assert tokenizer.chat_template == "{{ messages }}"


def test_empty_folder_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="holds no Hugging Face model"):
        resolve_base(str(tmp_path / "empty"), Workspace(tmp_path))


def test_hub_id_without_hub_access_names_the_alternatives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = resolve_base("someorg/some-model-that-is-not-cached", Workspace(tmp_path))
    assert ref.kind == "hub"
    with pytest.raises(ModelResolutionError) as error:
        load_tokenizer(ref)
    assert "could not load 'someorg/some-model-that-is-not-cached'" in error.value.message
    assert "bundled alias" in (error.value.hint or "")


def test_workspace_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "home"))
    assert Workspace.from_env().root == (tmp_path / "home").resolve()
    assert Workspace.from_env(tmp_path / "cli").root == (tmp_path / "cli").resolve()
    monkeypatch.delenv("TUNELOOP_HOME")
    monkeypatch.chdir(tmp_path)
    assert Workspace.from_env().root == (tmp_path / ".tuneloop").resolve()


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    first = runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "a.jsonl"), "--rows", "50", "--json"])
    runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "b.jsonl"), "--rows", "50"])
    assert first.exit_code == 0 and json.loads(first.stdout)["rows"] == 50
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    row = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    answer = json.loads(row["output"])
    assert set(answer) == {"name", "city", "product", "quantity", "date"} and isinstance(answer["quantity"], int)


@pytest.mark.slow
def test_bundled_smollm2_converts_once_and_loads(tmp_path: Path) -> None:
    """The real bundled model: GGUF -> cached safetensors folder with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    workspace = Workspace(tmp_path)
    ref = resolve_base("smollm2-135m-instruct", workspace)
    tokenizer = load_tokenizer(ref)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    folder = materialize(ref)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 130e6 < model.num_parameters() < 140e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][prompt["input_ids"].shape[1] :])
    mtime = (folder / "model.safetensors").stat().st_mtime
    materialize(resolve_base("smollm2-135m-instruct", workspace))  # cached: not converted again
    assert (folder / "model.safetensors").stat().st_mtime == mtime
