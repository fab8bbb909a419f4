"""Model files other tools write and read: an exported ``.safetensors`` file (weights, and a JSON that names the
architecture), a TorchScript archive or a ``torch.export`` program (``.pt2``), recognised by their bytes and read
back as modules."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from .registry import build_model
from .state import load_model_state

#: The file inside a TorchScript archive or a ``.pt2`` program (its extra file) that holds the model's description.
CARD_ENTRY = "iaat.json"


class ExportedProgramModule(nn.Module):
    """A ``torch.export`` program as a module: ``forward`` runs the program's graph; ``train()`` and ``eval()`` only
    set the flag, since the graph was captured in eval mode (``torch.export`` refuses to switch it), and
    ``state_dict()`` and ``load_state_dict()`` use the exported model's own parameter names (``--init-from`` loads
    them)."""

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.graph = program.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "ExportedProgramModule":
        self.training = mode
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.graph.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.graph.load_state_dict(state_dict, strict=strict, assign=assign)


def json_path(path: Union[str, Path]) -> Path:
    """Where the description of an exported model file lies: beside it, ``model.safetensors.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def file_format(path: Union[str, Path]) -> str:
    """``run`` (a folder), ``safetensors``, ``torchscript``, ``export`` (a ``torch.export`` ``.pt2`` program) or
    ``checkpoint`` (a PyTorch ``.pt``, or any other file: loading it as a checkpoint says what is wrong with it),
    from the bytes.

    Raises:
        CheckpointError: for a missing file or a damaged ``.safetensors`` file.
    """
    path = Path(path)
    if path.is_dir():
        return "run"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file); exported "
                              f".safetensors, TorchScript and .pt2 model files work too.")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names):
            return "export"
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a damaged safetensors file (its header does not parse).")
    return "checkpoint"  # loading it says whether it is damaged or something else


def load_exported(path: Union[str, Path]) -> tuple[nn.Module, dict]:
    """An exported ``.safetensors`` (rebuilt from its JSON, no pickle), TorchScript or ``.pt2`` file as
    ``(module, description)`` on the CPU in eval mode; the description is ``{}`` for a file without one."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "safetensors":
        return _load_safetensors(path)
    if fmt == "export":
        return _load_program(path)
    if fmt != "torchscript":
        raise CheckpointError(f"{path} is neither a .safetensors, a TorchScript nor a .pt2 (torch.export) file.")
    extra = {CARD_ENTRY: ""}
    try:
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a loadable TorchScript file ({first_line(e)}).") from None
    return model.eval(), (json.loads(extra[CARD_ENTRY]) if extra[CARD_ENTRY] else {})


def _load_program(path: Path) -> tuple[nn.Module, dict]:
    extra = {CARD_ENTRY: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # a damaged or foreign archive: one clear line
        raise CheckpointError(f"{path} is not a loadable torch.export file ({first_line(e) or type(e).__name__}).") \
            from None
    card = extra[CARD_ENTRY]
    return ExportedProgramModule(program).eval(), (json.loads(card) if card else {})


def _load_safetensors(path: Path) -> tuple[nn.Module, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    try:
        tensors = load(data)
        meta_text = safetensors_metadata(data).get("iaat")
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file ({e}).") from None
    beside = json_path(path)
    if not meta_text and not beside.is_file():
        raise CheckpointError(f"{path} holds weights without saying which model they belong to: no {beside.name} "
                              f"beside it and no iaat metadata inside. Evaluate it with --model module:factory "
                              f"--weights {path}.")
    # the description inside the file travels with it; the JSON beside it is its copy for people and tools
    where = f"the iaat metadata inside {path}" if meta_text else str(beside)
    try:
        meta = json.loads(meta_text if meta_text else beside.read_text())
        arch, shape = meta.get("architecture") or {}, meta.get("input_shape") or [3]
        num_classes, channels = int(meta["num_classes"]), int(shape[0])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{where} is not a readable model description ({type(e).__name__}: {e}); export "
                              f"the model again (iaat export RUN).") from None
    model = build_model(arch.get("name", "?"), num_classes, channels, depth=arch.get("depth"), width=arch.get("width"))
    load_model_state(model, tensors, str(path), arch.get("name", ""), arch.get("name", ""))
    return model.eval(), meta


def safetensors_metadata(data: bytes) -> dict:
    """The string metadata in a safetensors file's header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def state_dict_file(path: Union[str, Path]) -> dict:
    """Weights from a ``.safetensors`` file or a ``.pt`` state dict (``weights_only=True``: no code runs); a training
    checkpoint's ``model`` or ``state_dict`` entry is taken."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: no such file.")
    if file_format(path) == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with foreign objects, damaged zip: one clear line
        raise CheckpointError(f"--weights {path}: not a state dict torch can load safely "
                              f"({first_line(e)}).") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"--weights {path}: not a state dict (a mapping of names to tensors).")
    return obj
