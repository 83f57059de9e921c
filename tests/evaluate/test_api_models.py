"""API models as evaluation subjects and as the LLM judge.

Fast: parsing `openai:` / `url:` references and their errors, pricing tokens from a price table. Slow: a real
tuneloop gateway serving SmolLM2 on 127.0.0.1 is both an evaluated model (`url:...#MODEL`, beside the base model
generating in-process) and the judge; the checks are the mechanics (both orders asked, verdicts parsed, metrics
recomputed from judge.jsonl, outputs.jsonl, cost), not the 135M judge's taste.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_config, write_jsonl
from tests.serve.servers import start_serve, wait_ready
from tuneloop.cli import app
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.judge import combine_orders
from tuneloop.prices import api_price, load_prices
from tuneloop.registry.refs import ApiModel, resolve_api_ref
from tuneloop.stats import wilson_interval

runner = CliRunner()


def test_openai_reference_reads_base_url_and_key_from_the_environment() -> None:
    model = resolve_api_ref("openai:gpt-4o-mini", environ={"OPENAI_API_KEY": "sk-test"})
    assert isinstance(model, ApiModel) and model.provider == "openai" and model.label == "gpt-4o-mini"
    assert (model.endpoint.base_url, model.endpoint.model, model.endpoint.api_key) == (
        "https://api.openai.com/v1",
        "gpt-4o-mini",
        "sk-test",
    )
    assert model.price_names[0] == "openai-gpt-4o-mini"  # the shipped price table's naming
    other = resolve_api_ref("openai:m", environ={"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://proxy:9/v1/"})
    assert other.endpoint.base_url == "http://proxy:9/v1"


def test_url_reference_and_its_key_order() -> None:
    ref = "url:http://127.0.0.1:8000/v1#/models/SmolLM2 135M"
    model = resolve_api_ref(ref, environ={})
    assert model.endpoint.base_url == "http://127.0.0.1:8000/v1" and model.endpoint.model == "/models/SmolLM2 135M"
    assert model.endpoint.api_key is None and model.label == "SmolLM2-135M"  # path-safe label
    both = {"TUNELOOP_EVAL_API_KEY": "eval-key", "OPENAI_API_KEY": "openai-key"}
    assert resolve_api_ref(ref, environ=both).endpoint.api_key == "eval-key"
    assert resolve_api_ref(ref, environ={"OPENAI_API_KEY": "openai-key"}).endpoint.api_key == "openai-key"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("url:http://127.0.0.1:8000/v1", "names no model after `#`"),
        ("url:http://127.0.0.1:8000/v1#", "names no model after `#`"),
        ("url:127.0.0.1:8000/v1#m", "is not an http(s) URL"),
        ("openai:", "names no model"),
        ("openai:gpt-4o-mini", "$OPENAI_API_KEY is not set"),
    ],
)
def test_malformed_api_references_are_clear_errors(ref: str, message: str) -> None:
    with pytest.raises(TuneloopError) as error:
        resolve_api_ref(ref, environ={})
    assert message in error.value.message and error.value.hint


def test_eval_cli_reports_a_malformed_reference(train_config) -> None:
    config = str(train_config())
    result = runner.invoke(app, ["eval", "-c", config, "--model", "base", "--compare", "url:http://x/v1", "--json"])
    assert result.exit_code == 2 and "names no model after `#`" in json.loads(result.stdout)["error"]
    result = runner.invoke(app, ["eval", "-c", config, "--model", "base", "--judge", "base", "--json"])
    assert result.exit_code == 2 and "is not an API model reference" in json.loads(result.stdout)["error"]


def test_compared_models_are_deduplicated_and_labels_made_unique(train_config, workspace: Path) -> None:
    from tuneloop.config_file import load_config
    from tuneloop.evaluate.run import _subjects
    from tuneloop.workspace import Workspace

    config = load_config(train_config())
    refs = ["base", "url:http://h:1/v1#base", "url:http://h:1/v1#base", "none", "url:http://h:2/v1#org/m"]
    subjects = _subjects("base", refs, config, Workspace(workspace))
    assert [(s.label, s.ref) for s in subjects] == [
        ("base", "base"),
        ("base-2", "url:http://h:1/v1#base"),
        ("m", "url:http://h:2/v1#org/m"),
    ]


def test_tokens_priced_from_a_price_table(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    entry = {"usd_per_million_input_tokens": 2.0, "usd_per_million_output_tokens": 8.0}
    prices.write_text(
        yaml.safe_dump({"api": {"openai-gpt-x": entry, "only-output": {"usd_per_million_output_tokens": 1}}})
    )
    table = load_prices(prices)
    price = api_price(table, ["openai-gpt-x", "gpt-x"])
    assert price is not None and price.cost(1_000, 500) == pytest.approx((1_000 * 2 + 500 * 8) / 1e6)
    assert api_price(table, ["only-output"]).cost(1_000, 500) == pytest.approx(500 / 1e6)  # type: ignore[union-attr]
    assert api_price(table, ["unknown"]) is None
    prices.write_text(yaml.safe_dump({"api": {"broken": {"usd_per_million_input_tokens": 1}}}))
    with pytest.raises(TuneloopError, match=r"api\.broken needs usd_per_million_output_tokens"):
        load_prices(prices)


@pytest.fixture(scope="module")
def smollm2_gateway(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[str]:
    """`tuneloop serve` with SmolLM2 on the transformers engine, one per module; yields its /v1 URL."""
    root = tmp_path_factory.mktemp("judge-gateway")
    config = root / "serve.yaml"
    config.write_text(f"model: {{base: {smollm2_folder}}}\nserve: {{engine: transformers}}\n")
    # one torch thread: on a busy 2-core machine more threads slow every request down
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        process, url = start_serve(config, root / "ws")
    wait_ready(url, process)
    yield f"{url}/v1"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


@pytest.mark.slow
def test_api_model_evaluated_and_judged_by_a_real_gateway(
    smollm2_gateway: str, smollm2_folder: Path, tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = str(smollm2_folder)  # the gateway names its base model by the configured path
    rows = [
        {"prompt": "What is the capital of France?", "completion": "Paris"},
        {"prompt": "What is 2 + 2?", "completion": "4"},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = write_config(tmp_path, smollm2_folder, [{"path": str(data)}])
    prices = tmp_path / "prices.yaml"
    price = {"usd_per_million_input_tokens": 3.0, "usd_per_million_output_tokens": 12.0}
    prices.write_text(yaml.safe_dump({"api": {served: price}}))
    api_ref = f"url:{smollm2_gateway}#{served}"
    monkeypatch.delenv("TUNELOOP_EVAL_API_KEY", raising=False)
    result = runner.invoke(
        app,
        [
            "eval", "-c", str(config), "--model", "base", "--compare", api_ref, "--judge", api_ref,
            "--data", str(data), "--json",
            "--set", "eval.metrics=[perplexity, exact_match]",
            "--set", "eval.max_new_tokens=12",
            "--set", "eval.judge_max_new_tokens=24",
            "--set", "eval.rubric={helpfulness: answers the question fully and correctly}",
            "--set", f"eval.prices={prices}",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    api_label = smollm2_folder.name
    assert summary["models"] == {"base": "base", api_label: api_ref}
    report = json.loads((Path(summary["dir"]) / "metrics.json").read_text())
    base, api = report["metrics"]["base"], report["metrics"][api_label]

    # perplexity is local-only: measured for the in-process base model, a note for the API model
    assert "perplexity" in base and "perplexity" not in api
    assert any("perplexity not measured" in note for note in report["details"][api_label]["notes"])
    assert 0.0 <= api["exact_match"] <= 1.0

    # outputs.jsonl: every row with both models' answers, in the format /dashboard/rate reads
    outputs = [json.loads(line) for line in Path(summary["outputs"]).read_text().splitlines()]
    assert [row["id"] for row in outputs] == ["r0000", "r0001"]
    assert outputs[0]["prompt"] == rows[0]["prompt"] and outputs[0]["reference"] == "Paris"
    assert outputs[0]["messages"][-1] == {"role": "user", "content": rows[0]["prompt"]}
    assert set(outputs[0]["outputs"]) == {"base", api_label} and all(outputs[0]["outputs"].values())

    # cost: the test table's entry x the tokens the gateway counted
    usage = report["details"][api_label]["usage"]
    assert usage["requests"] == 2 and usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    expected = (usage["prompt_tokens"] * 3.0 + usage["completion_tokens"] * 12.0) / 1e6
    assert api["eval_cost_usd"] == pytest.approx(expected) and "eval_cost_usd" not in base

    # judge.jsonl: each row judged in both orders, answers swapped in the prompt; one grade per model and row
    records = [json.loads(line) for line in Path(report["judge"]["file"]).read_text().splitlines()]
    pairwise = [r for r in records if r["kind"] == "pairwise"]
    grades = [r for r in records if r["kind"] == "grade"]
    assert len(records) == report["judge"]["calls"] == 4 + 4
    judge_tokens = sum(r["prompt_tokens"] * 3.0 + r["completion_tokens"] * 12.0 for r in records) / 1e6
    assert report["judge"]["cost_usd"] == pytest.approx(judge_tokens)  # the judge priced by the same entry
    for row in outputs:
        orders = {r["order"]: r for r in pairwise if r["id"] == row["id"]}
        assert set(orders) == {1, 2}
        assert (orders[1]["a"], orders[1]["b"]) == ("base", api_label) == (orders[2]["b"], orders[2]["a"])
        first, second = orders[1]["prompt"], orders[2]["prompt"]
        mine, theirs = row["outputs"]["base"], row["outputs"][api_label]
        assert f"Assistant A's Answer]\n{mine}\n" in first and f"Assistant B's Answer]\n{theirs}\n" in first
        assert f"Assistant A's Answer]\n{theirs}\n" in second and f"Assistant B's Answer]\n{mine}\n" in second
        assert "[The Start of Reference Answer]\n" + row["reference"] in first
    assert sorted((r["model"], r["id"]) for r in grades) == sorted(
        (label, row["id"]) for label in ("base", api_label) for row in outputs
    )
    assert all(r["reply"] or r.get("error") for r in records)

    # the metrics, recomputed from judge.jsonl by the documented rule
    outcomes = [
        combine_orders(
            next(r["verdict"] for r in pairwise if r["id"] == row["id"] and r["order"] == 1),
            next(r["verdict"] for r in pairwise if r["id"] == row["id"] and r["order"] == 2),
        )
        for row in outputs
    ]
    wins, ties, losses = outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss")
    assert (base["judge_wins"], base["judge_ties"], base["judge_losses"]) == (wins, ties, losses)
    assert (api["judge_wins"], api["judge_losses"]) == (losses, wins)
    if wins + ties + losses:
        rate = (wins + ties / 2) / (wins + ties + losses)
        assert base["judge_win_rate"] == pytest.approx(rate)
        assert api["judge_win_rate"] == pytest.approx(1 - rate)
        low, high = wilson_interval(rate, wins + ties + losses)
        assert (base["judge_win_rate_ci_low"], base["judge_win_rate_ci_high"]) == pytest.approx((low, high))
        assert low <= rate <= high
    else:
        assert "judge_win_rate" not in base  # no pair with a verdict in both orders: no rate, not a made-up 0.5
    for label, metrics in (("base", base), (api_label, api)):
        mine = [r for r in records if r.get("model") == label or label in r.get("models", [])]
        unparsed = [r for r in mine if (r.get("verdict") if r["kind"] == "pairwise" else r.get("rating")) is None]
        assert metrics["judge_unparsed"] == len(unparsed)
        assert metrics["judge_unparsed_rate"] == pytest.approx(len(unparsed) / len(mine))
        ratings = [r["rating"] for r in grades if r["model"] == label and r["rating"] is not None]
        if ratings:
            assert 1 <= metrics["judge_score_mean"] == pytest.approx(sum(ratings) / len(ratings)) <= 5
            assert metrics["judge_helpfulness_mean"] == pytest.approx(metrics["judge_score_mean"])
        else:
            assert "judge_score_mean" not in metrics

    # the report has the judge's section
    markdown = (Path(summary["dir"]) / "report.md").read_text()
    assert "## LLM judge" in markdown and "judge.jsonl" in markdown and "base vs " + api_label in markdown
    html = Path(summary["report"]).read_text()
    assert 'id="judge-pairs"' in html and 'id="judge-grades"' in html

    # the engine hook: a local label whose answers come from an endpoint (here the same served model) instead of
    # in-process generation; same server, same greedy decoding -> the API model's answers
    from tuneloop.chat_client import ChatEndpoint
    from tuneloop.config_file import load_config
    from tuneloop.evaluate.run import run_evaluation
    from tuneloop.workspace import Workspace

    loaded = load_config(config, ["eval.metrics=[exact_match]", "eval.max_new_tokens=12"])
    hooked = run_evaluation(
        loaded,
        Workspace(workspace),
        "base",
        "none",
        data_file=data,
        endpoints={"base": ChatEndpoint(smollm2_gateway, served)},
    )
    assert hooked.details["base"]["endpoint"] == f"{served} at {smollm2_gateway}"
    again = [json.loads(line) for line in Path(hooked.outputs or "").read_text().splitlines()]
    assert [row["outputs"]["base"] for row in again] == [row["outputs"][api_label] for row in outputs]
