"""Check a generated RunPod deploy folder with the real `runpod` SDK (run in .venv-deploy) and print, as JSON, what
it found: the engine command handler.py starts under endpoint.json's env, the errors it gives for bad job inputs and
bad env, and endpoint.json as the SDK takes it (its keys bound to `runpod.create_template` / `create_endpoint`, the
GraphQL mutations the SDK generates from them parsed with graphql-core, and the env read back from the mutation).

    .venv-deploy/bin/python tests/deploy/runpod_check.py DEPLOY_FOLDER
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from offline import load  # this folder is on sys.path

BAD_INPUTS: dict[str, Any] = {
    "not_an_object": ["hello"],
    "no_known_field": {"prompt_text": "hi"},
    "empty_messages": {"messages": []},
    "message_without_role": {"messages": [{"content": "hi"}]},
    "bad_sampling_params": {"messages": [{"role": "user", "content": "hi"}], "sampling_params": [1]},
    "bad_stream": {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    "bad_openai_route": {"openai_route": "chat", "openai_input": {}},
    "bad_openai_input": {"openai_route": "/v1/chat/completions", "openai_input": "hi"},
}
BAD_ENVIRONMENTS: dict[str, dict[str, str]] = {
    "max_model_len_not_a_number": {"MAX_MODEL_LEN": "lots"},
    "max_loras_zero": {"MAX_LORAS": "0"},
    "lora_modules_not_json": {"LORA_MODULES": "extractor=/models/x"},
    "lora_modules_without_path": {"LORA_MODULES": '[{"name": "x"}]'},
}


async def handler_errors(handler: ModuleType) -> dict[str, Any]:
    """What the streaming handler yields for each bad input (it must not reach an engine: ENGINE_URL is unset and
    nothing listens)."""
    found = {}
    for name, job_input in BAD_INPUTS.items():
        found[name] = [part async for part in handler.handler({"id": name, "input": job_input})]
    return found


def graphql_env(mutation: str) -> dict[str, str]:
    """The env key/value pairs of a saveTemplate mutation, read back by graphql-core's parser."""
    from graphql import parse

    document = parse(mutation)
    field = document.definitions[0].selection_set.selections[0]
    template_input = next(argument.value for argument in field.arguments if argument.name.value == "input")
    env = next(item.value for item in template_input.fields if item.name.value == "env")
    pairs = {}
    for entry in env.values:
        values = {item.name.value: item.value.value for item in entry.fields}
        pairs[values["key"]] = values["value"]
    return pairs


def main(folder: Path) -> dict[str, Any]:
    import graphql
    import runpod
    from runpod.api.mutations import endpoints as endpoint_mutations
    from runpod.api.mutations import templates as template_mutations

    handler = load(folder / "handler.py")
    creator = load(folder / "create_endpoint.py")
    spec = json.loads((folder / "endpoint.json").read_text())
    env = spec["template"]["env"]

    environment_errors = {}
    for name, environ in BAD_ENVIRONMENTS.items():
        try:
            handler.engine_command(environ)
            environment_errors[name] = None
        except handler.InputError as error:
            environment_errors[name] = str(error)

    # endpoint.json's keys as the SDK's functions name their parameters (TypeError on an unknown or missing one).
    inspect.signature(runpod.create_template).bind(**creator.template_arguments(spec))
    inspect.signature(runpod.create_endpoint).bind(template_id="TEMPLATE_ID", **spec["endpoint"])
    template_mutation = template_mutations.generate_pod_template(**creator.template_arguments(spec))
    endpoint_mutation = endpoint_mutations.generate_endpoint_mutation(template_id="TEMPLATE_ID", **spec["endpoint"])
    graphql.parse(endpoint_mutation)
    try:  # without create_endpoint.py's escaping, the SDK's mutation is not GraphQL (LORA_MODULES has quotes)
        graphql.parse(template_mutations.generate_pod_template(**spec["template"]))
        unescaped_error = None
    except graphql.GraphQLError as error:
        unescaped_error = error.message

    return {
        "runpod_version": runpod.__version__,
        "engine_command": handler.engine_command(env),
        "engine_command_without_env": handler.engine_command({}),
        "engine_command_changed_on_the_endpoint": handler.engine_command(
            {**env, "MAX_MODEL_LEN": "4096", "LORA_MODULES": '[{"name": "other", "path": "/models/adapters/other"}]'}
        ),
        "served_model": handler.SERVED_MODEL,
        "input_errors": asyncio.run(handler_errors(handler)),
        "environment_errors": environment_errors,
        "good_input": handler.parse_job_input({"messages": [{"role": "user", "content": "hi"}]}),
        "openai_input": handler.parse_job_input(
            {"openai_route": "/v1/chat/completions", "openai_input": {"messages": [{"role": "user", "content": "hi"}]}}
        ),
        "template_env_from_mutation": graphql_env(template_mutation),
        "unescaped_template_mutation_error": unescaped_error,
        "endpoint_mutation_is_graphql": True,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
