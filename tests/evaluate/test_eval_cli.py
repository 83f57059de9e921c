from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()


@pytest.fixture
def trained(train_config) -> tuple[Path, dict]:
    config = train_config(max_steps=12)
    result = runner.invoke(app, ["train", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return config, json.loads(result.stdout)


def run_eval(config: Path, *args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["eval", "-c", str(config), "--set", "eval.max_new_tokens=8", "--json", *args])
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {"output": result.output}
    return result.exit_code, payload


def test_eval_compares_tuned_with_base_and_writes_the_report(trained, workspace: Path) -> None:
    config, run = trained
    code, summary = run_eval(
        config,
        "--model",
        run["run_id"],
        "--set",
        "eval.metrics=[perplexity, bleu, rouge, exact_match, accuracy, safety, generation_stats, latency]",
    )
    assert code == 0, summary
    assert summary["models"] == {"tuned": run["run_id"], "base": "base"}
    tuned, base = summary["metrics"]["tuned"], summary["metrics"]["base"]
    for name in (
        "perplexity",
        "exact_match",
        "accuracy",
        "rouge_l",
        "bleu",
        "toxicity_rate",
        "redteam_refusal_rate",
        "mean_output_tokens",
        "max_tokens_hit_rate",
        "ttft_s",
        "tokens_per_second",
    ):
        assert name in tuned and name in base, name
    assert tuned["perplexity"] < base["perplexity"]  # training lowered the loss on these rows
    assert summary["rows"] == 6
    # Paired tests on the same 6 rows: McNemar for the 0/1 metrics, the bootstrap for ROUGE; the differences are
    # the tuned-minus-base differences of the metrics themselves.
    significance = summary["significance"]
    assert significance["exact_match"]["test"].startswith("McNemar")
    assert significance["exact_match"]["difference"] == pytest.approx(tuned["exact_match"] - base["exact_match"])
    assert significance["rouge_l"]["difference"] == pytest.approx(tuned["rouge_l"] - base["rouge_l"])
    assert significance["exact_match"]["n"] == 6 and 0 <= significance["exact_match"]["p_value"] <= 1
    report = Path(summary["report"])
    html = report.read_text()
    assert 'id="metrics"' in html and "perplexity" in html and "Sample outputs" in html and "data:image/png" in html
    markdown = (report.parent / "report.md").read_text()
    assert "| metric | tuned | base | delta |" in markdown and "| perplexity |" in markdown
    assert "## Is the difference real?" in markdown and 'id="significance"' in html
    assert report.parent.parent.parent == Path(run["run_dir"])  # stored with the run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    logged = client.get_run(run["mlflow_run_id"]).data.metrics
    assert logged["eval.tuned.perplexity"] == pytest.approx(tuned["perplexity"])


def test_gates_and_strict_exit_codes(trained) -> None:
    config, run = trained
    passing = [
        "--model",
        run["run_id"],
        "--set",
        "eval.metrics=[perplexity]",
        "--set",
        "eval.gates={perplexity_improvement: 0.01}",
    ]
    code, summary = run_eval(config, *passing, "--strict")
    assert code == 0 and summary["gates"] == {"perplexity_improvement": "pass"}
    failing = [
        "--model",
        run["run_id"],
        "--set",
        "eval.metrics=[perplexity]",
        "--set",
        "eval.gates={perplexity_improvement: 0.99}",
    ]
    code, summary = run_eval(config, *failing)
    assert code == 0 and summary["gates"] == {"perplexity_improvement": "fail"}
    code, _ = run_eval(config, *failing, "--strict")
    assert code == 1
    significant = ["--model", run["run_id"], "--set", "eval.metrics=[exact_match]"]
    code, summary = run_eval(config, *significant, "--set", "eval.gates={exact_match_gain_significant: true}")
    gate, test = summary["gate_details"]["exact_match_gain_significant"], summary["significance"]["exact_match"]
    assert code == 0 and gate["p_value"] == test["p_value"]
    # The gate passes exactly when the gain is positive and significant: 6 rows cannot make it significant.
    assert summary["gates"]["exact_match_gain_significant"] == ("pass" if test["significant"] else "fail") == "fail"
    # A gate this evaluation cannot check is an error, after the evaluation is kept.
    code, summary = run_eval(
        config, *significant, "--compare", "none", "--set", "eval.gates={exact_match_improvement: 0.1}"
    )
    assert (
        code == 2 and "needs a comparison model" in summary["error"] and "evaluation itself is kept" in summary["error"]
    )
    kept = Path(summary["error"].split("kept: ")[1].split(";")[0])
    assert (kept / "metrics.json").exists() and (kept / "outputs.jsonl").exists()


def test_eval_on_a_file_with_limit_and_pairwise_sheet(trained, tmp_path: Path) -> None:
    config, run = trained
    data = tmp_path / "extra.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Repeat the number {i}", "completion": f"number {i} is {i}"}) + "\n"
            for i in range(100, 110)
        )
    )
    code, summary = run_eval(
        config,
        "--model",
        run["run_id"],
        "--data",
        str(data),
        "--limit",
        "4",
        "--pairwise",
        "--set",
        "eval.metrics=[exact_match]",
    )
    assert code == 0, summary
    assert summary["rows"] == 4 and summary["data"] == str(data)
    assert Path(summary["pairwise"]["sheet"]).exists() and Path(summary["pairwise"]["key"]).exists()


def test_eval_of_an_unknown_model_is_a_clear_error(train_config) -> None:
    code, payload = run_eval(train_config(), "--model", "no-such-run")
    assert code == 2 and "is not `base`, a registry reference, a run id" in payload["error"]


def test_lm_eval_harness_bridge_with_a_local_task(trained, tmp_path: Path) -> None:
    """The harness runs base and tuned; the tuned model (adapter applied) must fit the training text better, so an
    adapter that was not loaded would show up as equal numbers."""
    pytest.importorskip("lm_eval")
    config, run = trained
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # The training rows' own wording ("number i is i", tests/conftest.py train_config): the adapter learnt it.
    rows = [{"sentence": f"number {i} is {i}", "label": i % 2} for i in range(8)]
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'rows.jsonl'}\ntest_split: test\n"
    (tasks / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "tiny_numbers.yaml").write_text(
        f"task: tiny_numbers\n{data}"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{sentence}} is"\n'
        'doc_to_choice: ["even", "odd"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "tiny_numbers_text.yaml").write_text(
        f"task: tiny_numbers_text\n{data}"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{sentence}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    code, summary = run_eval(
        config,
        "--model",
        run["run_id"],
        "--compare",
        "base",
        "--harness",
        "tiny_numbers,tiny_numbers_text",
        "--harness-include",
        str(tasks),
        "--set",
        "eval.metrics=[perplexity]",
    )
    assert code == 0, summary
    tuned, base = summary["metrics"]["tuned"], summary["metrics"]["base"]
    for metrics in (tuned, base):
        assert 0.0 <= metrics["harness.tiny_numbers.acc"] <= 1.0
    # lm-eval scored the adapter: the tuned model's bits per byte on the training text are below the base's
    # (measured 5.76 vs 6.57 after the 12 training steps; without the adapter both are equal).
    assert tuned["harness.tiny_numbers_text.bits_per_byte"] < 0.95 * base["harness.tiny_numbers_text.bits_per_byte"]
    assert tuned["harness.tiny_numbers_text.word_perplexity"] < base["harness.tiny_numbers_text.word_perplexity"]
