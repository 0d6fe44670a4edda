"""Reading a torchvision detector export, or one of the torch engine's checkpoints (an export plus training state).

``config.json`` is read through :class:`bbadapt.bundle.schema.TorchvisionExport`; the model is built by
the export's *own* ``frcnn_runtime.py`` (the file that was checked against GluonCV when the export
was written), imported from the directory, never from bbadapt's copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
from types import ModuleType

from bbadapt.bundle.schema import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    MANIFEST,
    CheckpointSection,
    TorchvisionExport,
)
from bbadapt.platform.errors import OutputError

TRAINER_STATE = "trainer.pt"  # optimizer (+ GradScaler) state of a torch checkpoint
CHECKPOINT_SECTION = "checkpoint"  # the config.json section a torch checkpoint adds (CheckpointSection)


def is_export(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a torchvision export (by content: ``config.json`` and no bundle manifest)."""
    path = Path(directory)
    return (path / EXPORT_CONFIG).is_file() and not (path / MANIFEST).is_file()


def read_export(directory: str | os.PathLike) -> TorchvisionExport:
    """The export's config, validated; a missing or damaged file is one line (``OutputError``)."""
    path = Path(directory)
    if not path.is_dir():
        raise OutputError(f"{path} does not exist or is not a directory")
    if not (path / EXPORT_CONFIG).is_file():
        raise OutputError(f"{path} is not a torchvision detector export (no {EXPORT_CONFIG})")
    try:
        export = TorchvisionExport.from_json(path / EXPORT_CONFIG)
    except OutputError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise OutputError(f"{path / EXPORT_CONFIG}: damaged ({type(exc).__name__}: {exc})") from None
    for name in (export.runtime, EXPORT_WEIGHTS):
        if not (path / name).is_file():
            raise OutputError(f"{path} is not a complete torchvision detector export ({name} missing)")
    for name in ("backbone", "rpn", "roi_heads", "transform", "input"):
        if not export.section(name):
            raise OutputError(f"{path / EXPORT_CONFIG}: damaged (no {name!r} section)")
    return export


def checkpoint_of(export: TorchvisionExport, directory: Path) -> CheckpointSection | None:
    """The training state a torch checkpoint's config carries (None for a plain export)."""
    data = export.sections.get(CHECKPOINT_SECTION)
    return None if data is None else CheckpointSection.from_dict(data, str(directory / EXPORT_CONFIG))


def import_runtime(directory: Path, runtime: str) -> ModuleType:
    """Import the runtime file shipped in ``directory``."""
    name = f"_bbadapt_frcnn_runtime_{abs(hash(str(Path(directory).resolve())))}"
    spec = importlib.util.spec_from_file_location(name, Path(directory) / runtime)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code is one line
        sys.modules.pop(name, None)
        raise OutputError(f"{Path(directory) / runtime} cannot be imported ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return module


def load_model(directory: str | os.PathLike, device="cpu"):
    """(model, export config) of an export or checkpoint: eval mode, frozen layers without gradients."""
    path = Path(directory)
    export = read_export(path)
    runtime = import_runtime(path, export.runtime)
    try:
        model = runtime.load(path, device)
    except (RuntimeError, ValueError, KeyError, json.JSONDecodeError, OSError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise OutputError(f"{path}: the export does not load ({type(exc).__name__}: "
                          f"{' '.join(lines[:2])[:300]})") from None
    return model, export


_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "float16": "F16",
                       "bfloat16": "BF16"}


def safetensors_bytes(model, metadata: dict[str, str]) -> bytes:
    """``model.safetensors`` of the model's state dict (the layout the export's runtime reads), written here so the
    torch engine needs neither the ``safetensors`` package nor bbadapt's readers."""
    header: dict = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        raw = data.view(-1).view(torch_uint8()).numpy().tobytes() if data.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(data.dtype).removeprefix("torch.")], "shape": list(data.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def torch_uint8():
    import torch

    return torch.uint8
