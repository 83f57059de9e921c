"""Training beyond one process on CPU (gloo): DDP and FSDP2 with 2 torchrun workers, sharded resume, the plan.

Every rank writes a RankReport (runs/<id>/ranks/rank-K.json): what it held and a hash of its trainable tensors,
which is how these tests see synchronisation and sharding from outside the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()
CRASH_HOOK = Path(__file__).parent / "crash_hook"
pytestmark = pytest.mark.slow


def train(config: Path, workspace: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """`tuneloop train` in a subprocess (torchrun's workers need a real process tree)."""
    result = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "train", "-c", str(config), "--json", *args],
        env={**os.environ, "TUNELOOP_HOME": str(workspace), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.returncode, payload, result.stderr


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((run_dir / "ranks").glob("rank-*.json"))]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def fp32_config(train_config):
    """fp32, so DDP and FSDP can be compared to the last bit (bf16 autocast would round differently)."""
    return train_config(max_steps=6, eval_every=2, save_every=2, precision="fp32", report_to=[])


def test_ddp_two_processes_stay_in_sync_and_differ_from_one(fp32_config, tmp_path: Path) -> None:
    code, two, log = train(fp32_config, tmp_path / "ws2", "--nproc", "2")
    assert code == 0, log[-3000:]
    assert "[default1]:" in log  # every worker line carries its rank
    reports = rank_reports(Path(two["run_dir"]))
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert reports[0]["trainable_sha256"] == reports[1]["trainable_sha256"]  # gradients were averaged
    assert two["tokens"] == sum(r["tokens"] for r in reports) and all(r["tokens"] > 0 for r in reports)
    code, one, log = train(fp32_config, tmp_path / "ws1")
    assert code == 0, log[-3000:]
    first, second = adapter_tensors(Path(one["run_dir"])), adapter_tensors(Path(two["run_dir"]))
    assert first.keys() == second.keys()
    # Same seed and per-device batch, but twice the data per step: a different model.
    assert any(not torch.allclose(first[name], second[name]) for name in first)


def test_fsdp_shards_every_parameter_and_saves_a_plain_peft_adapter(fp32_config, tmp_path: Path) -> None:
    code, ddp, log = train(fp32_config, tmp_path / "ddp", "--nproc", "2")
    assert code == 0, log[-3000:]
    code, fsdp, log = train(fp32_config, tmp_path / "fsdp", "--nproc", "2", "--set", "train.distributed=fsdp")
    assert code == 0, log[-3000:]
    whole = rank_reports(Path(ddp["run_dir"]))[0]
    shards = rank_reports(Path(fsdp["run_dir"]))
    for report in shards:  # each rank holds about half of the trainable and of the frozen parameters
        assert report["strategy"] == "fsdp"
        assert 0.4 < report["trainable_local"] / whole["trainable_local"] <= 0.6
        assert 0.4 < report["frozen_local"] / whole["frozen_local"] <= 0.6
    assert sum(r["trainable_local"] for r in shards) == whole["trainable_local"]
    # Sharded or not, the same fp32 computation: the same losses.
    assert fsdp["train_loss"] == pytest.approx(ddp["train_loss"], abs=1e-5)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], abs=1e-5)
    # The adapter gathered from the shards is the one DDP trained, and plain PEFT loads it.
    gathered, replicated = adapter_tensors(Path(fsdp["run_dir"])), adapter_tensors(Path(ddp["run_dir"]))
    assert gathered.keys() == replicated.keys()
    assert all(torch.allclose(gathered[name], replicated[name], atol=1e-6) for name in gathered)
    sharded_loss = validation_loss_with_plain_peft(Path(fsdp["run_dir"]), fsdp["dataset_id"], tmp_path / "fsdp")
    replicated_loss = validation_loss_with_plain_peft(Path(ddp["run_dir"]), ddp["dataset_id"], tmp_path / "ddp")
    assert sharded_loss == pytest.approx(replicated_loss, abs=1e-5)


def test_qlora_with_fsdp_shards_the_4bit_weights_too(fp32_config, tmp_path: Path) -> None:
    """QLoRA's 4-bit weights are stored as the compute dtype (bnb_4bit_quant_storage) so FSDP2 shards them."""
    args = ["--nproc", "2", "--set", "train.distributed=fsdp", "--set", "train.method=qlora"]
    code, summary, log = train(fp32_config, tmp_path / "ws", *args)
    assert code == 0, log[-3000:]
    assert "bnb_4bit_quant_storage" in log  # the note says why
    reports = rank_reports(Path(summary["run_dir"]))
    assert reports[0]["frozen_local"] == reports[1]["frozen_local"] > 0
    assert reports[0]["trainable_local"] == reports[1]["trainable_local"] > 0
    assert reports[0]["trainable_sha256"] != reports[1]["trainable_sha256"]  # different shards, not copies
    assert summary["quantization"].startswith("bitsandbytes") and summary["eval_loss"] < 6.0


@pytest.mark.parametrize(("strategy", "sharded"), [("deepspeed_zero2", False), ("deepspeed_zero3", True)])
def test_deepspeed_trains_on_cpu_and_matches_ddp(fp32_config, tmp_path: Path, strategy: str, sharded: bool) -> None:
    """DeepSpeed's CPU accelerator over gloo, through Transformers' integration and tuneloop's generated config.
    ZeRO-2 partitions optimizer state and gradients (each rank still holds every parameter); ZeRO-3 the parameters too.
    Its communication op is compiled with the C++ compiler on first use (once per machine)."""
    pytest.importorskip("deepspeed", reason="deepspeed is installed by `make deepspeed` (part of `make test`)")
    code, ddp, log = train(fp32_config, tmp_path / "ddp", "--nproc", "2")
    assert code == 0, log[-3000:]
    code, zero, log = train(fp32_config, tmp_path / "zero", "--nproc", "2", "--set", f"train.distributed={strategy}")
    assert code == 0, log[-3000:]
    assert zero["train_loss"] == pytest.approx(ddp["train_loss"], abs=1e-4)
    whole, reports = rank_reports(Path(ddp["run_dir"]))[0], rank_reports(Path(zero["run_dir"]))
    held = [report["trainable_local"] + report["frozen_local"] for report in reports]
    total = whole["trainable_local"] + whole["frozen_local"]
    assert all(0.4 < size / total <= 0.6 for size in held) if sharded else held == [total, total]
    gathered, replicated = adapter_tensors(Path(zero["run_dir"])), adapter_tensors(Path(ddp["run_dir"]))
    assert all(torch.allclose(gathered[name], replicated[name], atol=1e-5) for name in replicated)


def validation_loss_with_plain_peft(run_dir: Path, dataset_id: str, workspace: Path) -> float:
    """The validation loss of the saved adapter loaded by PEFT alone (no tuneloop code on the model side)."""
    import pyarrow.parquet as pq
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneloop.data.collate import collate_padded

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    rows = pq.read_table(workspace / "datasets" / dataset_id / "val.parquet", columns=["input_ids", "labels"])
    batch = collate_padded(rows.to_pylist(), pad_token_id=0)
    with torch.no_grad():
        return float(model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss)


def test_fsdp_resumes_from_its_sharded_checkpoint_on_the_same_curve(fp32_config, tmp_path: Path) -> None:
    sharded = ["--nproc", "2", "--set", "train.distributed=fsdp"]
    code, uninterrupted, log = train(fp32_config, tmp_path / "full", *sharded)
    assert code == 0, log[-3000:]
    crash = {"PYTHONPATH": str(CRASH_HOOK), "TUNELOOP_TEST_CRASH_AT_STEP": "5"}
    code, crashed, log = train(fp32_config, tmp_path / "ws", *sharded, env=crash)
    assert code == 2 and "distributed training exited" in crashed["error"], log[-3000:]
    [run_dir] = (tmp_path / "ws" / "runs").iterdir()
    shards = {path.name for path in (run_dir / "checkpoints" / "checkpoint-4" / "sharded").iterdir()}
    assert shards == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # one file per rank: DCP, not a gathered copy
    code, resumed, log = train(fp32_config, tmp_path / "ws", *sharded, "--resume")
    assert code == 0, log[-3000:]
    assert resumed["run_id"] == run_dir.name and resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-5)
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-5)


def test_plan_shows_per_rank_memory_and_one_command_per_node(tmp_path: Path) -> None:
    """A Llama-3-8B-shaped model (config only, no weights): the answer before renting 16 GPUs."""
    llama = tmp_path / "llama3-8b"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
            }
        )
    )
    config = tmp_path / "plan.yaml"
    config.write_text(f"model: {{base: {llama}}}\ntrain: {{method: full, precision: bf16}}\n")

    def plan(*args: str) -> dict:
        result = runner.invoke(app, ["train", "-c", str(config), "--plan", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    topology = ["--nproc", "8", "--nnodes", "2", "--master-addr", "10.0.0.1", "--master-port", "29500"]
    ddp = plan(*topology)
    fsdp = plan(*topology, "--set", "train.distributed=fsdp")
    zero3 = plan(*topology, "--set", "train.distributed={strategy: deepspeed_zero3, cpu_offload: true}")
    assert ddp["world_size"] == 16 and ddp["per_rank_mb"]["weights"] > 25_000  # 8B params in fp32 master weights
    assert fsdp["per_rank_mb"]["weights"] < ddp["per_rank_mb"]["weights"] / 8
    assert fsdp["per_rank_mb"]["optimizer_and_gradients"] * 15 < ddp["per_rank_mb"]["optimizer_and_gradients"]
    assert (
        zero3["per_rank_mb"]["offloaded_to_host"] > 0 and zero3["deepspeed_config"]["zero_optimization"]["stage"] == 3
    )
    assert zero3["problem"] is None and any("CPU accelerator" in note for note in zero3["notes"])
    assert len(fsdp["commands"]) == 2 and "--node-rank 1" in fsdp["commands"][1]
    assert all("--master-addr 10.0.0.1" in command for command in fsdp["commands"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.distributed={strategy: ddp, cpu_offload: true}"], "cpu_offload applies to fsdp"),
        (["--set", "train.distributed={strategy: fsdp, backend: nccl}"], "needs GPUs"),
        (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "--node-rank 2 is not in 0..1"),
        (["--nnodes", "2"], "needs the address every node meets at"),
    ],
)
def test_impossible_setups_are_refused_before_launch(train_config, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", "-c", str(train_config()), "--nproc", "2", *args])
    assert result.exit_code == 2 and message in result.output, result.output
