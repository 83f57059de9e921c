"""The prompts of `tuneloop data synth` and the parsing of what the teacher writes back.

Self-instruct (Wang et al. 2022, as Stanford Alpaca used it): show the teacher a few numbered seed tasks, ask for
new ones in the same numbered layout, and read them back robustly — numbered (`1.`, `2)`, `Task 3:`) or bulleted
items, an optional `Input:` part per task, markdown emphasis stripped. The Self-Instruct heuristics drop items a
text-only model cannot do (images, files, audio) and items too short or too long to be an instruction.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFAULT_INSTRUCTION_TEMPLATE = """You are asked to come up with {count} new, diverse task instructions for training \
an AI assistant.

Requirements:
- Do not repeat the example tasks; vary the verbs, topics and kinds of task (open questions, writing, rewriting, \
classification, brainstorming, reasoning, coding, ...).
- Each instruction is one or two sentences that a text-only assistant can complete.
- When a task needs an input to work on (a text, a list, a sentence), give it after "Input:" on the next line.

Example tasks:
{examples}

Write {count} new tasks, numbered 1 to {count}, in the same layout as the examples."""

# Self-Instruct's filter: tasks a language model cannot carry out in text.
UNSUITABLE_WORDS = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
MIN_INSTRUCTION_WORDS = 3
MAX_INSTRUCTION_WORDS = 150
_NO_INPUT = {"", "<noinput>", "noinput", "none", "n/a", "na", "no input", "(none)", "-", "<no input>"}

_ITEM_START = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?(?:(?:task|instruction)\s*)?(\d{1,3})\s*[.):](?:\*\*)?\s*", re.I)
_BULLET = re.compile(r"^\s*[-*•]\s+")
_INSTRUCTION_LABEL = re.compile(r"^\s*(?:\*\*)?instruction\s*\d*\s*:(?:\*\*)?\s*", re.I)
_INPUT_LABEL = re.compile(r"^\s*(?:\*\*)?input\s*:(?:\*\*)?\s*", re.I)
_OUTPUT_LABEL = re.compile(r"^\s*(?:\*\*)?(?:output|answer|response)\s*:(?:\*\*)?", re.I)
_EMPHASIS = re.compile(r"\*\*|__")


@dataclass(frozen=True)
class Task:
    """An instruction, with the input it works on ("" when none)."""

    instruction: str
    input: str = ""

    def user_text(self) -> str:
        """The user turn, as the data pipeline's alpaca normalisation writes it."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction


@dataclass
class ParsedReply:
    tasks: list[Task]
    rejected: dict[str, int]  # reason -> items dropped: `truncated`, `bad_length`, `unsuitable`


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def format_examples(tasks: list[Task]) -> str:
    """Seed tasks as the numbered layout the teacher is asked to continue."""
    blocks = []
    for number, task in enumerate(tasks, start=1):
        block = f"{number}. {task.instruction.strip()}"
        if task.input.strip():
            block += f"\nInput: {task.input.strip()}"
        blocks.append(block)
    return "\n\n".join(blocks)


def instruction_prompt(template: str, examples: list[Task], count: int) -> str:
    # Plain replacement, not str.format: seed tasks (code, JSON) are full of braces.
    return template.replace("{examples}", format_examples(examples)).replace("{count}", str(count))


def parse_tasks(reply: str, truncated: bool = False) -> ParsedReply:
    """The tasks of one teacher reply. The last item of a reply cut at its token budget (`truncated`) is dropped:
    it may be an unfinished sentence."""
    items = _split_items(reply)
    rejected: dict[str, int] = {}
    if truncated and items:
        items.pop()
        rejected["truncated"] = 1
    tasks: list[Task] = []
    for item in items:
        task = _task_from_item(item)
        reason = None if task is None else unsuitable_reason(task)
        if task is None or reason is not None:
            key = reason or "bad_length"
            rejected[key] = rejected.get(key, 0) + 1
            continue
        tasks.append(task)
    return ParsedReply(tasks, rejected)


def unsuitable_reason(task: Task) -> str | None:
    """`bad_length` or `unsuitable` (Self-Instruct's heuristics), or None for a usable task."""
    words = task.instruction.split()
    if not (MIN_INSTRUCTION_WORDS <= len(words) <= MAX_INSTRUCTION_WORDS):
        return "bad_length"
    lowered = task.instruction.lower()
    if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in UNSUITABLE_WORDS):
        return "unsuitable"
    if not task.instruction[0].isalnum() and task.instruction[0] not in "\"'(¿¡":
        return "bad_length"  # punctuation or markup where an instruction should start: a fragment
    return None


def _split_items(reply: str) -> list[list[str]]:
    """Lines grouped into items: a numbered line starts one; without any numbering, bullets do; without either,
    each paragraph is one item."""
    lines = reply.replace("\r\n", "\n").split("\n")
    for start in (_ITEM_START, _BULLET):
        if any(start.match(line) for line in lines):
            items: list[list[str]] = []
            for line in lines:
                if start.match(line):
                    items.append([start.sub("", line, count=1)])
                elif items:
                    items[-1].append(line)
            return items
    return [paragraph.split("\n") for paragraph in re.split(r"\n\s*\n", reply) if paragraph.strip()]


def _task_from_item(lines: list[str]) -> Task | None:
    """Instruction lines until an `Input:` label, input lines until an `Output:` label (a teacher that also
    answers: the answer is asked for separately)."""
    instruction: list[str] = []
    given: list[str] = []
    part = instruction
    for line in lines:
        if _OUTPUT_LABEL.match(line):
            break
        if _INPUT_LABEL.match(line):
            part = given
            line = _INPUT_LABEL.sub("", line, count=1)
        elif part is instruction:
            line = _INSTRUCTION_LABEL.sub("", line, count=1)
        part.append(line)
    text = " ".join(line.strip() for line in instruction if line.strip())
    if not given:  # `... Input: ...` on the instruction's own line
        text, _, inline = text.partition(" Input:")
        given = [inline]
    text = _clean(text)
    extra = _clean("\n".join(given).strip())
    if extra.lower() in _NO_INPUT:
        extra = ""
    if not text:
        return None
    return Task(text, extra)


def _clean(text: str) -> str:
    return _EMPHASIS.sub("", text).strip().strip('"').strip()
