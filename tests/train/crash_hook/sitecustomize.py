"""Loaded by every Python process started with this folder on PYTHONPATH (tests only): with $TUNELOOP_TEST_CRASH_AT_STEP
set, each Trainer crashes after that optimizer step, as a worker dying mid-run would. The shipped package has no such
hook; multi-process tests need one that reaches the torchrun workers."""

import os

if os.environ.get("TUNELOOP_TEST_CRASH_AT_STEP"):
    import transformers

    _STEP = int(os.environ["TUNELOOP_TEST_CRASH_AT_STEP"])

    class _CrashAtStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step >= _STEP:
                raise RuntimeError(f"injected crash after step {state.global_step}")

    _original_init = transformers.Trainer.__init__

    def _init_with_crash(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _original_init(self, *args, **kwargs)
        self.add_callback(_CrashAtStep())

    transformers.Trainer.__init__ = _init_with_crash
