"""Worker processes for data preparation: an ordered map over chunks of rows, in one process or a pool.

Results come back in the order of the chunks, whatever the number of workers, so the prepared dataset does not
depend on `data.num_proc`. Workers are forked where the platform can (as `datasets.map(num_proc=)` and torch's
DataLoader do on Linux): a spawned worker would re-run the caller's script, which breaks scripts without an
`if __name__ == "__main__":` guard. Workers only run tokenizers, numpy and scikit-learn, never torch, so the parent's
torch threads do not matter; the tokenizer's own thread pool is switched off in them (the processes are the
parallelism). The pool starts only when the stream is long enough to pay for the start-up; shorter streams run in
this process.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

PARALLEL_MIN_CHUNKS = 4  # fewer chunks than this run in-process (a pool costs a second or two to start and join)
_TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity masks
        return os.cpu_count() or 1


def resolve_num_proc(setting: int | None) -> int:
    """`data.num_proc` resolved: null means the cores available."""
    return setting if setting is not None else available_cores()


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    num_proc: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> Iterator[Result]:
    """`function` over `items`, results in input order. `initializer(*initargs)` sets up each worker's state (and
    this process's, when the items are few or `num_proc` is 1). At most `2 * num_proc` chunks are in flight, so a
    long stream is never read ahead into memory."""
    iterator = iter(items)
    head = list(itertools.islice(iterator, PARALLEL_MIN_CHUNKS))
    if num_proc <= 1 or len(head) < PARALLEL_MIN_CHUNKS:
        initializer(*initargs)
        for item in itertools.chain(head, iterator):
            yield function(item)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Set while workers start (the tokenizers library reads it when the process forks), restored afterwards.
    previous = os.environ.get(_TOKENIZERS_PARALLELISM)
    os.environ[_TOKENIZERS_PARALLELISM] = "false"
    try:
        with multiprocessing.get_context(method).Pool(
            num_proc, initializer=_in_worker, initargs=(initializer, initargs)
        ) as pool:
            pending: deque[Any] = deque()
            for item in itertools.chain(head, iterator):
                pending.append(pool.apply_async(function, (item,)))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop(_TOKENIZERS_PARALLELISM, None)
        else:
            os.environ[_TOKENIZERS_PARALLELISM] = previous


def _in_worker(initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    # The processes are the parallelism: a tokenizer's own thread pool in each would only contend for the same cores.
    os.environ[_TOKENIZERS_PARALLELISM] = "false"
    initializer(*initargs)
