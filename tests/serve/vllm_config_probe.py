"""Run with vLLM's own python (.venv-vllm): parse vLLM server flags with vLLM's own parser, build its engine config
(no model is loaded, no engine started) and print, as one JSON line, what the flags became. Used by
tests/serve/test_engine_flags.py to check the flags `vllm_arguments` builds."""

from __future__ import annotations

import json
import sys

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main() -> None:
    arguments = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    validate_parsed_serve_args(arguments)
    config = AsyncEngineArgs.from_cli_args(arguments).create_engine_config()
    speculative = config.speculative_config
    print(
        json.dumps(
            {
                "dtype": str(config.model_config.dtype),
                "kv_cache_dtype": config.cache_config.cache_dtype,
                "prefix_caching": config.cache_config.enable_prefix_caching,
                "max_num_seqs": config.scheduler_config.max_num_seqs,
                "speculative": None
                if speculative is None
                else {
                    "method": speculative.method,
                    "num_speculative_tokens": speculative.num_speculative_tokens,
                    "prompt_lookup_max": speculative.prompt_lookup_max,
                    "prompt_lookup_min": speculative.prompt_lookup_min,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
