"""`tuneloop data synth`: instruction data written by a served teacher model, filtered, with its provenance.

    self-instruct   rounds of: sample k seed tasks per request -> the teacher writes new numbered tasks ->
                    parse (`synth_prompts`) -> drop instructions too close to a seed or an accepted one
                    (ROUGE-L) -> the teacher answers each -> row filters (`synth_filters`) -> keep,
                    until `--num` rows are kept or `data.synth.max_rounds` rounds have run
    answer          the seed rows are the prompts (in file order): the teacher answers them -> row filters

The teacher is any OpenAI-compatible endpoint (`chat_client`; the CLI resolves `openai:` / `url:` references).
Requests run concurrently with a progress bar; a failed request is counted, and only a teacher that answers none
stops the run (the first request goes alone, so an unreachable server fails fast with its error).

Writes `--out` (JSON Lines, `alpaca` or `messages`, readable by `tuneloop data prepare`) and beside it
`<out>.provenance.json`: teacher, templates (text and SHA-256), sampling settings, filters, the seed file and its
hash, the seed rows behind every written row, counts of what each stage dropped, token usage and time.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneloop import __version__
from tuneloop.artifacts._json import write_json
from tuneloop.chat_client import ChatAnswer, ChatEndpoint, Messages, chat_generate
from tuneloop.config import LoopConfig, SynthConfig
from tuneloop.data.formats import Message, Sample
from tuneloop.data.synth_filters import GENERATED_SOURCE, InstructionPool, filter_rows
from tuneloop.data.synth_prompts import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    Task,
    instruction_prompt,
    parse_tasks,
    template_sha256,
)
from tuneloop.data.synth_seeds import SeedSet, SeedTask, read_seed_tasks
from tuneloop.errors import TuneloopError
from tuneloop.keys import file_sha256, tree_sha256
from tuneloop.models import configured_base, load_tokenizer
from tuneloop.workspace import Workspace

PROVENANCE_SUFFIX = ".provenance.json"

# Every reason a candidate can be dropped, in pipeline order (the table and provenance list them in this order).
DROP_REASONS = (
    "unparsable",  # an instruction-writing reply with no task in it
    "truncated",  # the last task of a reply cut at max_new_tokens
    "bad_length",  # an instruction under 3 or over 150 words, or a fragment
    "unsuitable",  # needs images, files, audio... (Self-Instruct's word list)
    "similar_to_seed",  # ROUGE-L to a seed instruction >= instruction_similarity
    "similar_to_generated",  # ... to an instruction accepted earlier
    "answer_failed",  # the answer request failed
    "empty_answer",
    "answer_truncated",  # stopped at answer_max_new_tokens (drop_truncated_answers)
    "duplicate",  # data.filters, against rows kept before
    "duplicate_of_seed",  # ... against the seeds
    "toxic",
    "near_duplicate",
    "near_duplicate_of_seed",
    "too_short",
    "too_long",
    "render_error",
)


@dataclass
class _Row:
    task: Task
    answer: str
    seeds: list[SeedTask]
    round: int
    sample: Sample


@dataclass
class SynthResult:
    """What one `data synth` run wrote and dropped."""

    out: Path
    provenance: Path
    mode: str
    requested: int
    written: int
    dropped: dict[str, int]
    unused: int  # accepted instructions left unanswered when --num was reached
    requests: dict[str, int]  # sent, failed
    usage: dict[str, int]  # prompt_tokens, completion_tokens
    rounds: int
    seconds: float
    seeds: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "provenance": str(self.provenance),
            "mode": self.mode,
            "requested": self.requested,
            "written": self.written,
            "dropped": self.dropped,
            "unused_instructions": self.unused,
            "requests": self.requests,
            "usage": self.usage,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "seed_data": self.seeds,
        }


def provenance_path(out: Path) -> Path:
    """Where the provenance of `out` is written: beside it, `<name>.provenance.json`."""
    return out.with_name(out.name + PROVENANCE_SUFFIX)


def synthesize(
    config: LoopConfig,
    workspace: Workspace,
    teacher: ChatEndpoint,
    teacher_ref: str,
    seed_data: Path,
    num: int,
    out: Path,
    mode: str | None = None,
    concurrency: int | None = None,
    console: Console | None = None,
) -> SynthResult:
    """Generate up to `num` filtered rows into `out` with `teacher`; see the module docstring."""
    if num < 1:
        raise TuneloopError(f"--num {num}: ask for at least one row")
    if out.resolve() == seed_data.resolve():
        raise TuneloopError(f"--out {out} is the seed file", hint="write the generated rows to another file")
    settings = config.data.synth.model_copy(
        update={key: value for key, value in (("mode", mode), ("concurrency", concurrency)) if value is not None}
    )
    if settings.mode not in ("self-instruct", "answer"):
        raise TuneloopError(f"--mode {settings.mode!r} is not a mode", hint="use self-instruct or answer")
    console = console or Console(stderr=True)
    seeds = read_seed_tasks(seed_data)
    with console.status(f"loading the tokenizer of {config.model.base} (length filters)"):
        tokenizer = load_tokenizer(configured_base(config, workspace), config.chat_template_spec())
    run = _SynthRun(config, settings, teacher, teacher_ref, seeds, tokenizer, console)
    started = time.perf_counter()
    with run.progress:
        rows = run.answer_mode(num) if settings.mode == "answer" else run.self_instruct(num)
    seconds = round(time.perf_counter() - started, 2)
    _write_rows(out, rows, settings.output_format)
    result = SynthResult(
        out=out,
        provenance=provenance_path(out),
        mode=settings.mode,
        requested=num,
        written=len(rows),
        dropped={reason: run.dropped.get(reason, 0) for reason in DROP_REASONS},
        unused=run.unused,
        requests={"sent": run.sent, "failed": run.failed},
        usage={"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens},
        rounds=run.rounds,
        seconds=seconds,
        seeds={
            "path": str(seed_data),
            "rows_read": seeds.rows_read,
            "rows_usable": len(seeds.tasks),
            "rows_unusable": dict(seeds.unusable),
        },
    )
    write_json(result.provenance, _provenance(result, run, seeds, rows))
    return result


class _SynthRun:
    """One generation run: the teacher's requests, their counters, and the rows kept so far."""

    def __init__(
        self,
        config: LoopConfig,
        settings: SynthConfig,
        teacher: ChatEndpoint,
        teacher_ref: str,
        seeds: SeedSet,
        tokenizer: Any,
        console: Console,
    ) -> None:
        self.config = config
        self.settings = settings
        self.teacher = teacher
        self.teacher_ref = teacher_ref
        self.seeds = seeds
        self.tokenizer = tokenizer
        self.template = settings.instruction_template or DEFAULT_INSTRUCTION_TEMPLATE
        self.dropped: Counter[str] = Counter()
        self.sent = self.failed = self.prompt_tokens = self.completion_tokens = 0
        self.first_error: str | None = None
        self.unused = 0
        self.rounds = 0
        self.kept: list[_Row] = []
        # Seeds with answers take part in row deduplication; every seed in instruction similarity.
        self.seed_samples = [seed.sample(str(seeds.path)) for seed in seeds.tasks if seed.output is not None]
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )

    # -- modes ---------------------------------------------------------------------------------------------------
    def answer_mode(self, num: int) -> list[_Row]:
        """Answer the first `num` seed prompts, in file order."""
        self.rounds = 1
        chosen = self.seeds.tasks[:num]
        self._answer_and_filter([(seed.task, [seed]) for seed in chosen], round_number=1)
        return self.kept

    def self_instruct(self, num: int) -> list[_Row]:
        pool = InstructionPool(
            [seed.task.instruction for seed in self.seeds.tasks], self.settings.instruction_similarity
        )
        rng = random.Random(self.settings.seed)
        per_request = self.settings.instructions_per_request
        k = min(self.settings.seed_tasks_per_prompt, len(self.seeds.tasks))
        # Accepted instructions not answered yet: a round answers only what is missing, the rest waits for the next.
        backlog: list[tuple[Task, list[SeedTask]]] = []
        while len(self.kept) < num and self.rounds < self.settings.max_rounds:
            self.rounds += 1
            remaining = num - len(self.kept)
            if len(backlog) < remaining:
                # Twice what is missing: parsing and the filters drop a share of what a teacher writes.
                requests = math.ceil(2 * (remaining - len(backlog)) / per_request)
                backlog += self._write_instructions(pool, [rng.sample(self.seeds.tasks, k) for _ in range(requests)])
            self._answer_and_filter(backlog[:remaining], self.rounds)
            backlog = backlog[remaining:]
        self.unused = len(backlog)
        return self.kept[:num]

    def _write_instructions(
        self, pool: InstructionPool, examples: list[list[SeedTask]]
    ) -> list[tuple[Task, list[SeedTask]]]:
        """New tasks (with the seeds each request showed) that parse and pass the instruction filters."""
        per_request = self.settings.instructions_per_request
        prompts: list[Messages] = [
            [{"role": "user", "content": instruction_prompt(self.template, [s.task for s in group], per_request)}]
            for group in examples
        ]
        replies = self._ask(
            prompts, self.settings.max_new_tokens, self.settings.temperature, f"round {self.rounds}: write instructions"
        )
        candidates: list[tuple[Task, list[SeedTask]]] = []
        for reply, group in zip(replies, examples, strict=True):
            if reply.error is not None:
                continue
            parsed = parse_tasks(reply.text, truncated=reply.hit_max_tokens)
            self.dropped.update(parsed.rejected)
            if not parsed.tasks and not parsed.rejected:
                self.dropped["unparsable"] += 1
            for task in parsed.tasks:
                reason = pool.admit(task)
                if reason is None:
                    candidates.append((task, group))
                else:
                    self.dropped[reason] += 1
        return candidates

    # -- answers and filters ---------------------------------------------------------------------------------------
    def _answer_and_filter(self, tasks: list[tuple[Task, list[SeedTask]]], round_number: int) -> None:
        if not tasks:
            return
        system = self.settings.answer_system
        prompts: list[Messages] = [
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": t.user_text()}]
            for t, _ in tasks
        ]
        answers = self._ask(
            prompts,
            self.settings.answer_max_new_tokens,
            self.settings.answer_temperature,
            f"round {round_number}: answer" if self.settings.mode == "self-instruct" else "answer prompts",
        )
        new: list[_Row] = []
        for (task, seeds), answer in zip(tasks, answers, strict=True):
            reason = self._answer_problem(answer)
            if reason is not None:
                self.dropped[reason] += 1
                continue
            messages = [Message("user", task.user_text()), Message("assistant", answer.text, train=True)]
            position = len(self.kept) + len(new)
            sample = Sample(messages, "chat", GENERATED_SOURCE, position + 1, None)
            new.append(_Row(task, answer.text, seeds, round_number, sample))
        by_sample = {id(row.sample): row for row in new}
        earlier = self.seed_samples + [row.sample for row in self.kept]
        kept, rejected = filter_rows([row.sample for row in new], earlier, self.config.data, self.tokenizer)
        self.dropped.update(rejection.reason for rejection in rejected)
        self.kept += [by_sample[id(sample)] for sample in kept]

    def _answer_problem(self, answer: ChatAnswer) -> str | None:
        if answer.error is not None:
            return "answer_failed"
        if not answer.text.strip():
            return "empty_answer"
        if answer.hit_max_tokens and self.settings.drop_truncated_answers:
            return "answer_truncated"
        return None

    def _ask(self, prompts: list[Messages], max_tokens: int, temperature: float, title: str) -> list[ChatAnswer]:
        """The teacher's replies, failures kept (counted). Until one request has succeeded, the first goes alone:
        an unreachable or misnamed teacher then stops the run after one request's retries, not after all of them."""
        task = self.progress.add_task(title, total=len(prompts))
        replies: list[ChatAnswer] = []
        pending = prompts
        if self.sent == self.failed and pending:
            replies = self._generate(pending[:1], max_tokens, temperature, task)
            if replies[0].error is not None:
                raise TuneloopError(
                    f"the teacher {self.teacher_ref} did not answer: {replies[0].error}",
                    hint="check that the server is up and that --teacher names a model it serves "
                    "(url:http://HOST:PORT/v1#MODEL as /v1/models lists it, or openai:MODEL), and the API key "
                    "($TUNELOOP_EVAL_API_KEY or $OPENAI_API_KEY)",
                )
            pending = pending[1:]
        if pending:
            replies += self._generate(pending, max_tokens, temperature, task)
        return replies

    def _generate(self, prompts: list[Messages], max_tokens: int, temperature: float, task: Any) -> list[ChatAnswer]:
        replies = chat_generate(
            self.teacher,
            prompts,
            max_tokens,
            concurrency=self.settings.concurrency,
            progress=lambda done: self.progress.advance(task, done),
            keep_failures=True,
            temperature=temperature,
            seed=self.settings.seed + self.sent,  # a distinct, reproducible sampling seed per request
        )
        self.sent += len(replies)
        for reply in replies:
            if reply.error is not None:
                self.failed += 1
                self.first_error = self.first_error or reply.error
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.new_tokens
        return replies


def _write_rows(out: Path, rows: list[_Row], output_format: str) -> None:
    """JSON Lines, written to a temporary sibling and renamed: a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for line, row in enumerate(rows, start=1):
            record = {"id": f"{out.stem}-{line}", **_row_fields(row, output_format)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(out)


def _row_fields(row: _Row, output_format: str) -> dict[str, Any]:
    if output_format == "messages":
        return {
            "messages": [
                {"role": "user", "content": row.task.user_text()},
                {"role": "assistant", "content": row.answer},
            ]
        }
    return {"instruction": row.task.instruction, "input": row.task.input, "output": row.answer}


def _provenance(result: SynthResult, run: _SynthRun, seeds: SeedSet, rows: list[_Row]) -> dict[str, Any]:
    settings = run.settings
    templates: dict[str, Any] = {}
    if settings.mode == "self-instruct":
        templates["instructions"] = _template_record(run.template, settings.instruction_template is None)
    if settings.answer_system:
        templates["answer_system"] = _template_record(settings.answer_system, False)
    return {
        "tool": f"tuneloop {__version__} data synth",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": result.seconds,
        "mode": settings.mode,
        "teacher": {"ref": run.teacher_ref, "model": run.teacher.model, "base_url": run.teacher.base_url},
        "templates": templates,
        "sampling": {
            "temperature": settings.temperature,
            "answer_temperature": settings.answer_temperature,
            "max_new_tokens": settings.max_new_tokens,
            "answer_max_new_tokens": settings.answer_max_new_tokens,
            "seed_tasks_per_prompt": settings.seed_tasks_per_prompt,
            "instructions_per_request": settings.instructions_per_request,
            "seed": settings.seed,
            "concurrency": settings.concurrency,
        },
        "filters": {
            "instruction_similarity": settings.instruction_similarity,
            "drop_truncated_answers": settings.drop_truncated_answers,
            "data.filters": run.config.section_dump("data")["filters"],
            "tokenizer": run.config.model.base,
        },
        "seed_data": {**result.seeds, "sha256": tree_sha256(seeds.path)},  # a folder's: over its files
        "output": {
            "path": str(result.out),
            "sha256": file_sha256(result.out),
            "format": settings.output_format,
            "rows": result.written,
        },
        "counts": {
            "requested": result.requested,
            "written": result.written,
            "rounds": result.rounds,
            "requests": result.requests,
            "dropped": result.dropped,
            "unused_instructions": result.unused,
        },
        "usage": result.usage,
        "first_request_error": run.first_error,
        # Row i (1-based line of the output) <- the seed rows shown to the teacher (self-instruct) or answered.
        "rows": [
            {
                "line": line,
                "id": f"{result.out.stem}-{line}",
                "round": row.round,
                "seed_rows": [seed.row for seed in row.seeds],
                "seed_lines": [seed.line for seed in row.seeds],
            }
            for line, row in enumerate(rows, start=1)
        ],
    }


def _template_record(text: str, built_in: bool) -> dict[str, Any]:
    return {"text": text, "sha256": template_sha256(text), "built_in": built_in}
