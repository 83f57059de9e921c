"""A failed `tuneloop train` reaches Sentry: the real sentry-sdk sends to an ingest endpoint on 127.0.0.1
(tests/sentry_receiver.py). The run is real (tiny model); the failure is injected into the Trainer's step after two
steps, since a training failure cannot be provoked on demand otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.sentry_receiver import SentryReceiver, exception_of
from tuneloop import __version__
from tuneloop.cli import app


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_run_id(
    train_config: Any, tiny_model_dir: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sentry_sdk
    import transformers

    original = transformers.Trainer.training_step

    def failing_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step >= 2:
            raise RuntimeError("injected: the loss became NaN")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", failing_step)
    with SentryReceiver() as receiver:
        config = train_config(sentry_dsn=receiver.dsn, max_steps=6, eval_every=3, save_every=3, report_to=[])
        result = CliRunner().invoke(app, ["train", "-c", str(config), "--json"])
    assert result.exit_code != 0
    assert "injected: the loss became NaN" in result.output  # the user still sees the failure
    assert not sentry_sdk.get_client().is_active()  # the run closed its client: nothing leaks into later tests
    (event,) = receiver.events
    assert exception_of(event)["type"] == "RuntimeError"
    assert exception_of(event)["value"] == "injected: the loss became NaN"
    (run_id,) = [folder.name for folder in (workspace / "runs").iterdir() if folder.is_dir()]
    tags = event["tags"]
    assert tags["component"] == "train" and tags["run_id"] == run_id and tags["step"] == "2"
    assert tags["model"] == str(tiny_model_dir) and tags["method"] == "lora" and tags["rank"] == "0"
    assert event["release"] == f"tuneloop@{__version__}"
    # No data rows (they are in local variables of the failing frames) and no request of any kind.
    sent = b"".join(receiver.bodies)
    assert b"Repeat the number" not in sent and b"number 4 is 4" not in sent
