"""Exports: `peft` (the adapter folder), `merged` (PEFT merge into full safetensors), `gguf` (llama.cpp's own
converter on the merged model), `gguf-lora` (llama.cpp's LoRA converter), `gptq` / `awq` (4-bit weights in the
compressed-tensors format vLLM loads, by llm-compressor on the merged model). Every export is checked: merged logits
equal adapter logits within tolerance; a GGUF file must read back with `gguf`; a GPTQ/AWQ checkpoint must reload to
the logits it was saved with, and its top-1 agreement with the unquantised model on held-out texts is reported.

The converters are llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` with the gguf-py that ships
beside them (PyPI's `gguf` lacks what current converters need). tuneloop takes them from the llama-cpp-python sdist
(fetched once with pip into ~/.cache/tuneloop), or from `$TUNELOOP_LLAMA_CPP` (a llama.cpp checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Literal

from tuneloop.binaries import llama_cpp_tool
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_saved_tokenizer
from tuneloop.registry.refs import ModelSpec, resolve_model_ref
from tuneloop.workspace import Workspace

ExportFormat = Literal["peft", "merged", "gguf", "gguf-lora", "gptq", "awq"]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CONVERTER_QUANTS = {"f16", "bf16", "f32", "q8_0"}  # what the converter writes itself; k-quants need llama-quantize


def export(
    reference: str,
    fmt: ExportFormat,
    quant: str,
    out: Path | None,
    config: LoopConfig,
    workspace: Workspace,
    calibration: Path | None = None,
) -> dict[str, Any]:
    """`tuneloop export`: a model reference (registry name, run id, folder) in `fmt`, into `out` (default: the
    workspace's exports folder). `calibration`: the data source GPTQ/AWQ calibrate on (default: the config's first
    data source)."""
    spec = resolve_model_ref(reference, config, workspace)
    target = workspace.ensure(out or workspace.export_dir(reference, fmt))
    if fmt in ("gptq", "awq"):
        with tempfile.TemporaryDirectory(dir=workspace.ensure(workspace.cache)) as scratch:
            _merged(spec, Path(scratch) / "merged")
            texts = write_calibration_texts(
                calibration, config, Path(scratch) / "merged", Path(scratch) / "texts.jsonl"
            )
            return export_w4a16(Path(scratch) / "merged", target, fmt, texts)
    if fmt == "peft":
        return export_peft(_adapter_or_error(spec, "a full model, not an adapter", "merged or gguf"), target)
    if fmt == "merged":
        return _merged(spec, target)
    if fmt == "gguf-lora":
        return export_gguf_lora(spec.base_folder, _adapter_or_error(spec, "no adapter to convert", "gguf"), target)
    if spec.adapter is None:
        return export_gguf(spec.weights, target, quant)
    with tempfile.TemporaryDirectory(dir=workspace.ensure(workspace.cache)) as scratch:
        _merged(spec, Path(scratch))
        return export_gguf(Path(scratch), target, quant)


def _adapter_or_error(spec: ModelSpec, problem: str, instead: str) -> Path:
    if spec.adapter is None:
        raise TuneloopError(f"{spec.ref} is {problem}", hint=f"use --format {instead}")
    return spec.adapter


def _merged(spec: ModelSpec, target: Path) -> dict[str, Any]:
    if spec.adapter is None:
        shutil.copytree(spec.weights, target, dirs_exist_ok=True)
        return {"format": "merged", "path": str(target), "parity_max_abs_diff": 0.0}
    return export_merged(spec.base_folder, spec.adapter, target, trust_remote_code=spec.trust_remote_code)


def export_peft(adapter: Path, out: Path) -> dict[str, Any]:
    shutil.copytree(adapter, out, dirs_exist_ok=True)
    return {"format": "peft", "path": str(out)}


def export_merged(
    base_folder: Path, adapter: Path, out: Path, tolerance: float = 1e-3, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Merge the adapter into the base weights (fp32), save safetensors + tokenizer, and check the logits."""
    import torch

    tokenizer = load_saved_tokenizer(adapter, trust_remote_code)
    model = load_model(
        base_folder, dtype=torch.float32, adapters={"default": adapter}, trust_remote_code=trust_remote_code
    ).eval()
    probe = tokenizer(["Hello, how are you?", "Extract the order: 3 lamps"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**probe).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    reloaded = load_model(out, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        actual = reloaded(**probe).logits
    difference = float((expected - actual).abs().max())
    if difference > tolerance:
        raise TuneloopError(f"merged export differs from the adapter: max |logit difference| {difference:.2e}")
    return {"format": "merged", "path": str(out), "parity_max_abs_diff": difference}


def export_gguf(merged_folder: Path, out: Path, quant: str) -> dict[str, Any]:
    """llama.cpp's converter writes f16/bf16/f32/q8_0 itself; other types (q4_k_m, q5_k_m, q4_0, ...) are made from
    the f16 file by llama.cpp's `llama-quantize` (built by `make llamacpp`)."""
    tools = converter_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"model-{quant}.gguf"
    if quant in CONVERTER_QUANTS:
        _run_converter(
            tools, "convert_hf_to_gguf.py", [str(merged_folder), "--outfile", str(target), "--outtype", quant]
        )
        return {"format": "gguf", "path": str(target), **read_back(target)}
    quantize = llama_cpp_tool("llama-quantize", "TUNELOOP_LLAMA_QUANTIZE")
    if quantize is None:
        raise TuneloopError(
            f"--quant {quant} needs llama.cpp's llama-quantize binary after conversion",
            hint=f"run `make llamacpp` (builds .llamacpp/bin/llama-quantize), or use one of "
            f"{', '.join(sorted(CONVERTER_QUANTS))}",
        )
    f16 = out / "model-f16.gguf"
    _run_converter(tools, "convert_hf_to_gguf.py", [str(merged_folder), "--outfile", str(f16), "--outtype", "f16"])
    result = subprocess.run([str(quantize), str(f16), str(target), quant.upper()], capture_output=True, text=True)
    f16.unlink(missing_ok=True)
    if result.returncode != 0:
        raise TuneloopError(f"llama-quantize failed for {quant}: {(result.stdout + result.stderr).strip()[-400:]}")
    return {"format": "gguf", "path": str(target), **read_back(target)}


def export_gguf_lora(base_folder: Path, adapter: Path, out: Path) -> dict[str, Any]:
    tools = converter_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "adapter-f16.gguf"
    _run_converter(
        tools,
        "convert_lora_to_gguf.py",
        [str(adapter), "--base", str(base_folder), "--outfile", str(target), "--outtype", "f16"],
    )
    return {"format": "gguf-lora", "path": str(target), **read_back(target)}


def read_back(path: Path) -> dict[str, Any]:
    """Open a GGUF file with the `gguf` reader: it must parse and hold tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    if not reader.tensors:
        raise TuneloopError(f"{path} has no tensors: the conversion failed")
    architecture = reader.fields.get("general.architecture")
    name = bytes(architecture.parts[architecture.data[0]]).decode() if architecture else None
    return {"tensors": len(reader.tensors), "architecture": name, "bytes": path.stat().st_size}


def converter_dir() -> Path:
    """A folder with convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/ and gguf-py/."""
    configured = os.environ.get("TUNELOOP_LLAMA_CPP")
    if configured:
        path = Path(configured)
        if not (path / "convert_hf_to_gguf.py").exists():
            raise TuneloopError(f"$TUNELOOP_LLAMA_CPP={configured} has no convert_hf_to_gguf.py")
        return path
    # Shared by every workspace of this user: the sdist is 76 MB.
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneloop"
    target = cache_root / f"llama.cpp-converters-{LLAMA_CPP_PYTHON.split('==')[1]}"
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    download = cache_root / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(download),
            LLAMA_CPP_PYTHON,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise TuneloopError(
            f"could not fetch llama.cpp's converters ({LLAMA_CPP_PYTHON} sdist): {result.stderr.strip()[-300:]}",
            hint="set $TUNELOOP_LLAMA_CPP to a llama.cpp checkout",
        )
    staging = cache_root / f"llama.cpp-converters.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archives[-1]) as archive:
        members = [
            m
            for m in archive.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and (
                m.name.endswith(("/convert_hf_to_gguf.py", "/convert_lora_to_gguf.py"))
                or "/vendor/llama.cpp/gguf-py/" in m.name
                or "/vendor/llama.cpp/conversion/" in m.name
            )
        ]
        archive.extractall(staging, members=members, filter="data")
    root = next(staging.glob("*/vendor/llama.cpp"))
    if not target.exists():
        root.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_converter(tools: Path, script: str, arguments: list[str]) -> None:
    environment = {
        **os.environ,
        "PYTHONPATH": str(tools / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "NO_LOCAL_GGUF": "",
    }
    result = subprocess.run(
        [sys.executable, str(tools / script), *arguments], capture_output=True, text=True, env=environment, check=False
    )
    if result.returncode != 0:
        raise TuneloopError(f"{script} failed: {result.stderr.strip()[-800:]}")


QUANT_SCRIPT = Path(__file__).with_name("w4a16_quantize.py")
QUANTIZATION_REPORT = "tuneloop_quantization.json"
CALIBRATION_TEXTS = 144  # 128 to calibrate on + 16 held out for the agreement check (the script's defaults)


def default_quant_python() -> Path:
    return Path(os.environ.get("TUNELOOP_QUANT_PYTHON", ".venv-quant/bin/python"))


def write_calibration_texts(source: Path | None, config: LoopConfig, model_folder: Path, out: Path) -> Path:
    """The first CALIBRATION_TEXTS rows of `source` (any file `tuneloop data prepare` reads), each rendered as the
    model sees it in training (chat rows through its chat template), one `{"text"}` per line of `out`."""
    from tuneloop.config import SourceConfig
    from tuneloop.data.formats import RowError, detect_format, normalise, prepare_record
    from tuneloop.data.sources import read_records

    if source is None:
        raise TuneloopError(
            "--format gptq/awq calibrates on sample texts",
            hint="pass --calibration FILE (any data file tuneloop reads)",
        )
    if not source.exists():
        raise TuneloopError(f"calibration data {source} does not exist", hint="pass --calibration FILE")
    tokenizer = load_saved_tokenizer(model_folder)
    records = [record.data for record in read_records(source, limit=CALIBRATION_TEXTS * 2) if record.error is None]
    fmt = detect_format(records[:50], str(source))
    source_config = SourceConfig(path=str(source))
    texts = []
    for record in records:
        try:
            messages, kind = normalise(prepare_record(record, source_config), fmt, source_config)
        except (RowError, KeyError, TypeError):
            continue
        turns = [{"role": message.role, "content": message.content} for message in messages]
        texts.append(turns[0]["content"] if kind == "text" else tokenizer.apply_chat_template(turns, tokenize=False))
        if len(texts) == CALIBRATION_TEXTS:
            break
    if len(texts) < 32:
        raise TuneloopError(
            f"{source}: {len(texts)} usable rows for calibration; GPTQ/AWQ need at least 32 (144 are used)",
            hint="pass a larger --calibration file",
        )
    out.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return out


def export_w4a16(merged_folder: Path, out: Path, method: Literal["gptq", "awq"], calibration: Path) -> dict[str, Any]:
    """4-bit weights by `method` through llm-compressor, run by the quantisation virtualenv (w4a16_quantize.py)."""
    python = default_quant_python()
    if not python.exists():
        raise TuneloopError(
            f"--format {method} runs llm-compressor from its own virtualenv; {python} is missing",
            hint="run `make quant` (creates .venv-quant), or set $TUNELOOP_QUANT_PYTHON",
        )
    command = [str(python), str(QUANT_SCRIPT), str(merged_folder), str(out), "--method", method]
    completed = subprocess.run(
        [*command, "--calibration", str(calibration)], capture_output=True, text=True, env=_quiet_env()
    )
    if completed.returncode != 0:
        raise TuneloopError(f"{method} quantisation failed: {completed.stderr.strip()[-1500:]}")
    summary = {"format": method, "path": str(out), **json.loads(completed.stdout.strip().splitlines()[-1])}
    # Kept beside the weights: what 4 bits cost this model is worth knowing wherever the folder goes.
    (out / QUANTIZATION_REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "LOGURU_LEVEL": "WARNING"}
