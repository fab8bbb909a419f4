"""Models in and out: a trained model as one file other tools can use, and any model file back as a module.

Three export formats, each a model that takes images in [0, 1] with its normalisation inside (what
RobustBench and AutoAttack expect), and a small JSON beside it that says what the model is
(architecture and its arguments, classes, input size, training method and radius, its latest
accuracy, the iaat version):

* ``safetensors``: the weights only, no code and no pickle; :func:`load_model` rebuilds the
  architecture from the JSON (also stored in the file's own metadata, so the file alone suffices).
* ``torchscript``: the traced module, loadable with ``torch.jit.load`` without iaat installed
  (its JSON also travels inside the archive). PyTorch 2.13 marks TorchScript as deprecated.
* ``export``: the ``torch.export`` program (``.pt2``, any batch size), loadable with
  ``torch.export.load(FILE).module()`` without iaat installed; the successor of TorchScript
  (its JSON travels as the program's extra file ``iaat.json``).

:func:`load_model` also takes run folders and checkpoints, and :func:`factory_model` builds a user's
own architecture (``module:factory``) and loads weights into it, so ``iaat eval`` can evaluate any of them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from . import __version__
from .attacks.pgd import modes_kept
from .ema import EMA_KEY
from .errors import CheckpointError, ConfigError, first_line
from .models.files import CARD_ENTRY, file_format, json_path, load_exported, safetensors_metadata, state_dict_file
from .models.state import load_model_state

FORMATS = ("safetensors", "torchscript", "export")
#: The file name extensions of each export format, the usual one first: a name that says another format (or none
#: known) is refused, since tools pick the loader by the extension.
EXTENSIONS = {"safetensors": (".safetensors",), "torchscript": (".pt", ".pth", ".ts"), "export": (".pt2",)}
MODEL_FORMAT = "iaat-model"


# --------------------------------------------------------------------------- export


def model_card(path: Path, cfg: Any, ckpt: dict, model: nn.Module, weights: str) -> dict:
    """The JSON that describes an exported run's model (sizes in [0, 1] units)."""
    from .engine import rundir

    data = ckpt.get("data") or {}
    run_dir = path if path.is_dir() else None
    training: dict = {"method": cfg.method.name, "epochs": ckpt.get("epoch"), "norm": cfg.attack.norm, "eps": cfg.eps}
    rows = rundir.read_metrics(run_dir) if run_dir else []
    if rows and "radius_mean" in rows[-1]:
        training["radius_mean"] = rows[-1]["radius_mean"]
    return _card(model, {"name": cfg.model.name, "depth": cfg.model.depth, "width": cfg.model.width},
                 data.get("num_classes"), data.get("image_shape"), dataset=cfg.data.dataset,
                 **({"classes": data["classes"]} if data.get("classes") else {}), training=training,
                 weights=weights, accuracy=_latest_accuracy(run_dir, rows, training, weights))


def _card(model: nn.Module, architecture: dict, num_classes: Optional[int], input_shape: Optional[list],
          **about: Any) -> dict:
    """A model file's description: what every one says, then ``about`` (data set, training, weights, accuracy)."""
    normalize = getattr(model, "normalize", None)
    return {
        "format": MODEL_FORMAT, "version": 1, "iaat_version": __version__, "architecture": architecture,
        "num_classes": num_classes, "input_shape": input_shape, "input_range": [0, 1],
        "normalization_inside": None if normalize is None or not hasattr(normalize, "mean") else {
            "mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist()},
        **about, "units": "sizes (eps, radii) in [0, 1] image units",
    }


def _white_box(ev: dict) -> bool:
    """Whether the evaluation's worst case includes a white-box attack that takes at least one step."""
    over = [ev["attacks"].get(label, {}) for label in (ev.get("worst_case") or {}).get("over", [])]
    return any(a.get("kind") not in (None, "transfer") and (a.get("kind") != "pgd" or a.get("steps", 0) > 0)
               for a in over)


def _latest_accuracy(run_dir: Optional[Path], rows: list, training: dict, weights: str) -> Optional[dict]:
    """The run's test evaluation (iaat eval) of these weights at the training radius and norm, with a white-box attack
    among its attacks (PGD-0 or a transfer attack alone says little), the one on the most images (the newest of
    those); else its newest held-out numbers from metrics.jsonl."""
    from .engine import rundir

    evals = sorted(run_dir.glob("eval/*.json"), key=lambda p: p.stat().st_mtime) if run_dir else []
    best = None
    for path in evals:
        ev = rundir.read_evaluation(path)
        if not (ev is not None and ev["attacks"] and ev.get("norm") == training["norm"]
                and isinstance(ev.get("eps"), (int, float)) and abs(ev["eps"] - training["eps"]) < 1e-9
                and ev.get("epoch") == training["epochs"] and ev.get("weights", weights) == weights
                and ev.get("split") == "test" and _white_box(ev)):
            continue
        if best is None or ev.get("n", 0) >= best[0].get("n", 0):
            best = (ev, path)
    if best is not None:
        ev, path = best
        worst = ev.get("worst_case") or {}
        return {"clean": ev["clean"], "robust": worst.get("accuracy"), "attacks": worst.get("over"),
                "split": ev.get("split"), "n": ev.get("n"), "from": str(path.relative_to(run_dir))}
    for row in reversed(rows):
        robust = [k for k in row if k.startswith("val_pgd")]
        if "val_clean_acc" in row and robust:
            steps = robust[0][len("val_pgd"):-len("_acc")]
            return {"clean": row["val_clean_acc"], "robust": row[robust[0]], "attacks": [f"PGD-{steps}"],
                    "split": "held-out part of the training split", "from": f"metrics.jsonl, epoch {row['epoch']}"}
    return None


def export_model(run: Union[str, Path, nn.Module], out: Union[str, Path], fmt: Optional[str] = None,
                 weights: str = "auto", overwrite: bool = False,
                 input_shape: Optional[tuple[int, ...]] = None) -> tuple[Path, Path]:
    """Write a run's model, or any module (normalisation inside, [0, 1] inputs), to ``out`` and its description
    beside it.

    Args:
        run: a run folder (its newest valid checkpoint), a checkpoint file, or a module trained elsewhere (your own
            loop: ``torchscript`` or ``export`` only, since a ``.safetensors`` file holds no code to rebuild it).
        out: the model file to write, named for ``fmt`` (:data:`EXTENSIONS`, or no extension); its description
            goes to ``out`` + ``.json`` beside it.
        fmt: ``safetensors``, ``torchscript`` or ``export`` (``torch.export``, a ``.pt2`` file); by default the one
            ``out``'s extension names (``.pt2``: export, ``.pt``: torchscript), else safetensors.
        weights: ``auto`` (the averaged weights when the run keeps them, else the raw ones), ``raw`` or ``ema``.
        overwrite: replace existing files.
        input_shape: a module's input ``(C, H, W)`` (runs know theirs).

    Returns:
        ``(model file, JSON file)``.

    Example (``run``: a run folder, ``folder``: a folder to write to):
        >>> import iaat, torch
        >>> model_file, description = iaat.export_model(run, folder / "model.safetensors")
        >>> model_file.name, description.name
        ('model.safetensors', 'model.safetensors.json')
        >>> iaat.load_model(model_file)(torch.rand(2, 3, 32, 32)).shape  # [0, 1] images in, logits out
        torch.Size([2, 10])
        >>> net = iaat.NormalizedModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)),
        ...                            mean=(0.5,), std=(0.25,))  # trained in your own loop
        >>> program, _ = iaat.export_model(net, folder / "mine.pt2", input_shape=(3, 8, 8))  # .pt2: torch.export
        >>> iaat.load_model(program)(torch.rand(5, 3, 8, 8)).shape
        torch.Size([5, 4])
    """
    from .engine.checkpoint import atomic_write_bytes

    out, meta_path = Path(out), json_path(out)
    fmt = format_of(out) if fmt is None else fmt
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if weights not in ("auto", "raw", "ema"):
        raise ConfigError(f"weights must be auto, raw or ema, got {weights!r}.")
    _check_extension(out, fmt)
    if out.is_dir():
        raise ConfigError(f"out {out} is a folder; name the model file to write (e.g. {out / 'model'}"
                          f"{EXTENSIONS[fmt][0]}).")
    for path in (out, meta_path):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; choose another --out (out=) or pass --overwrite (overwrite=True).")
    with _cpu_eval(run) if isinstance(run, nn.Module) else contextlib.nullcontext() as module:
        model, card = _module_card(module, fmt, input_shape) if module is not None else _run_card(Path(run), weights)
        text = json.dumps(card, indent=2)
        if fmt == "safetensors":
            from safetensors.torch import save

            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            payload = save(tensors, metadata={"iaat": text})
        elif fmt == "torchscript":
            payload = _torchscript_bytes(model, card["input_shape"], text)
        else:
            payload = _program_bytes(model, card["input_shape"], text)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, payload)
    card["file"] = {"name": out.name, "format": fmt, "sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write_bytes(meta_path, (json.dumps(card, indent=2) + "\n").encode())
    return out, meta_path


def format_of(out: Path) -> str:
    """The export format ``out``'s extension names; safetensors where it names none.

    Example:
        >>> from pathlib import Path
        >>> format_of(Path("m.pt2")), format_of(Path("m.pt")), format_of(Path("model_eps0.5"))
        ('export', 'torchscript', 'safetensors')
    """
    return _named_format(Path(out)) or "safetensors"


def _named_format(out: Path) -> Optional[str]:
    """The export format whose extension ``out`` has, or None."""
    return next((f for f in FORMATS if out.suffix.lower() in EXTENSIONS[f]), None)


def _check_extension(out: Path, fmt: str) -> None:
    """``out`` must end in an extension of ``fmt`` (or have none): a TorchScript archive named .safetensors
    misleads every tool and person that opens it."""
    suffix = out.suffix.lower()
    owner = _named_format(out)
    # none, or a dot in the name (model_eps0.5, wrn.ep100): only another format's extension or an unknown word
    if suffix in EXTENSIONS[fmt] or not (owner or suffix[1:].isalpha()):
        return
    writes = ", ".join(f"{f} writes {'/'.join(EXTENSIONS[f])}" for f in FORMATS)
    problem = (f"a {suffix} name says {owner}, but the format (--format, fmt=) is {fmt}" if owner
               else f"{out.suffix} is not an extension of any export format")
    fix = f"pass --format {owner} (fmt={owner!r}), or " if owner else ""
    raise ConfigError(f"out {out}: {problem} ({writes}); {fix}name the {fmt} file *{EXTENSIONS[fmt][0]}.")


def _run_card(run: Path, weights: str) -> tuple[nn.Module, dict]:
    from .engine.runs import load_run

    model, cfg, ckpt_path, ckpt = load_run(run, weights=weights)
    card = model_card(run, cfg, ckpt, model, "ema" if weights != "raw" and EMA_KEY in ckpt else "raw")
    card["source"] = {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch")}
    return model, card


@contextlib.contextmanager
def _cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` on the CPU in eval mode, to export; the caller's module keeps its device and mode: a copy is
    exported, or, where the module cannot be copied (it holds a lock or an open file), the module itself, put back
    afterwards."""
    try:
        copied = copy.deepcopy(model)
    except Exception:  # whatever deepcopy raises (a lock, an open file): exporting in place still works
        copied = None
    if copied is not None:
        yield copied.cpu().eval()
        return
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    with modes_kept(model):
        try:
            yield model.cpu().eval()
        finally:
            if len(devices) == 1:
                model.to(devices.pop())


def _module_card(model: nn.Module, fmt: str, input_shape: Optional[tuple]) -> tuple[nn.Module, dict]:
    """A module from elsewhere: its description says what can be known without a run (classes, input shape)."""
    if fmt == "safetensors":
        raise ConfigError("a module of your own exports as torchscript or export (a .pt2 program); a .safetensors "
                          "file holds weights only, and only iaat's own architectures can be rebuilt from it.")
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
            and all(isinstance(d, int) and d > 0 for d in input_shape)):
        raise ConfigError(f"exporting a module needs input_shape=(C, H, W) of its images, got {input_shape!r}.")
    from .attacks.pgd import check_logits

    try:
        with torch.no_grad():
            logits = model(torch.rand(2, *input_shape))
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"the module fails on a batch of float32 images of shape (2, {', '.join(map(str, input_shape))}) "
                          f"({type(e).__name__}: {first_line(e, 200)}); check input_shape=(C, H, W).") from None
    check_logits(logits, torch.zeros(2, dtype=torch.long), labels=False)
    return model, _card(model, {"name": type(model).__name__}, logits.shape[1], list(input_shape), dataset=None,
                        training=None, weights="given", accuracy=None)


def _torchscript_bytes(model: nn.Module, input_shape: list, text: str) -> bytes:
    model = model.cpu().eval()
    example = torch.rand(2, *input_shape)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={CARD_ENTRY: text})
    return buffer.getvalue()


def _program_bytes(model: nn.Module, input_shape: list, text: str) -> bytes:
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (torch.rand(2, *input_shape),), dynamic_shapes=({0: batch},))
    except Exception as e:  # an architecture torch.export cannot capture: say so in one line
        raise ConfigError(f"torch.export could not capture this model ({type(e).__name__}: {first_line(e, 300)}); "
                          f"export it as safetensors or torchscript instead.") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={CARD_ENTRY: text})
    return buffer.getvalue()


# --------------------------------------------------------------------------- load


def read_model_file(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
                    weights: str = "auto") -> tuple[nn.Module, dict]:
    """A model file as ``(module in eval mode, its description)``; the description is ``{}`` when the file has none.

    Reads a ``.safetensors`` file exported by iaat (with its JSON beside it or inside it; no pickle is
    involved), a TorchScript file (``torch.jit.load``), a ``torch.export`` ``.pt2`` file, an iaat checkpoint or
    a run folder. ``weights`` picks a run's or checkpoint's weights as :func:`export_model` does; an exported
    file holds one set, and asking it for the other is an error.
    """
    from .engine.runs import load_run

    if weights not in ("auto", "raw", "ema"):
        raise ConfigError(f"weights must be auto, raw or ema, got {weights!r}.")
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"a model file or run folder is given by its path (str or Path), got {type(path).__name__}.")
    path = Path(path)
    if file_format(path) in ("run", "checkpoint"):
        model, cfg, ckpt_path, ckpt = load_run(path, weights=weights)
        meta = model_card(path, cfg, ckpt, model, "ema" if weights != "raw" and EMA_KEY in ckpt else "raw")
    else:
        model, meta = load_exported(path)
        held = meta.get("weights")
        if weights != "auto" and held is not None and held != weights:
            raise ConfigError(f"{path} holds the {held} weights of its run, not the {weights} ones; export those "
                              f"with iaat export RUN --{weights}.")
    return model.to(device or "cpu").eval(), meta


def load_model(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
               weights: str = "auto") -> nn.Module:
    """Any model file iaat writes, as a module in eval mode that takes images in [0, 1].

    ``path``: an exported ``.safetensors`` file (rebuilt from its JSON without any pickle), a
    TorchScript or ``.pt2`` (``torch.export``) file, an iaat checkpoint or a run folder (its newest valid
    checkpoint). ``weights``: for a run or checkpoint, ``auto`` (the averaged weights of ``train.ema`` when
    the run keeps them, else the trained ones: what ``iaat eval`` and :func:`export_model` use), ``raw`` or
    ``ema``.

    Example (``run``: a run folder, ``folder``: a folder to write to):
        >>> import iaat, torch
        >>> script, _ = iaat.export_model(run, folder / "model.pt", "torchscript")
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.equal(iaat.load_model(script)(x), iaat.load_model(run)(x))  # the same logits
        True
        >>> program, _ = iaat.export_model(run, folder / "model.pt2", "export")  # torch.export
        >>> torch.equal(torch.export.load(program).module()(x), iaat.load_model(run)(x))
        True
    """
    return read_model_file(path, device, weights)[0]


def factory_model(spec: str, weights: Optional[Union[str, Path]] = None, num_classes: Optional[int] = None,
                  in_channels: Optional[int] = None) -> nn.Module:
    """A user's own architecture: ``module:factory`` (importable, e.g. ``mypkg.nets:wide_resnet``) called with
    ``num_classes`` and ``in_channels`` where it takes them (see :func:`iaat.models.registry.factory_net`), then
    ``weights`` loaded into it (a ``.safetensors`` file, or a ``.pt`` state dict read with ``weights_only=True``)."""
    from .models.registry import factory_net

    model = factory_net(spec, num_classes, in_channels, what="--model")
    if weights is not None:
        try:
            load_model_state(model, state_dict_file(weights), str(weights), spec, "")
        except CheckpointError:
            if Path(weights).suffix == ".safetensors" and "iaat" in safetensors_metadata(Path(weights).read_bytes()):
                raise CheckpointError(f"{weights} is a model exported by iaat (its architecture and normalisation "
                                      f"inside): evaluate it without --model, as iaat eval {weights}.") from None
            raise
    return model.eval()
