"""Run configuration: six sections (data, model, method, attack, optim, train).

A config is built from defaults, then a YAML file, then explicit CLI flags, then
``--set section.key=value`` overrides, and validated as a whole before anything is
written. Unknown keys are errors with a "did you mean" suggestion; values are type
checked; eps and step sizes are in pixel units over 255 (see :mod:`iaat.units`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, first_line
from .schema import build_dataclass, check_keys, did_you_mean
from .units import PixelSize, format_size, parse_size

SECTIONS = ("data", "model", "method", "attack", "optim", "train")


@dataclass
class DataConfig:
    """Which data set, where it lives, and how the training split is made."""

    dataset: str = "cifar10"  #: cifar10 | cifar100 | digits | imagefolder (ROOT/train/<class>, ROOT/val/<class>)
    data_dir: Optional[str] = None  #: folder holding (or parent of) the official python archive layout
    train_subset: Optional[int] = None  #: train on a fixed class-balanced subset of this many images
    val_size: int = 1000  #: held out of the training split for end-of-epoch evaluation (never the test set)
    split_seed: int = 0  #: seed of the val/subset split, independent of the training seed
    augment: bool = True  #: random crop (zero padding of 1/8 of the side: 4 pixels on CIFAR) and horizontal flip
    download: bool = True  #: download the official archive when missing (needs internet)
    image_size: Optional[int] = None  #: imagefolder: side of the training crops and evaluation center crops (224)
    resize: Optional[int] = None  #: imagefolder: short side before the evaluation center crop (image_size*256/224)


@dataclass
class ModelConfig:
    """Architecture by registry name; inputs are always images in [0, 1]."""

    #: small_cnn | resnet18 | preact_resnet18 | wideresnet | wrn-32-10 | wrn-34-10; resnet50 | resnet101 | resnet152;
    #: or your own as module:factory (called with num_classes, in_channels, depth and width where it takes them)
    name: str = "resnet18"
    depth: Optional[int] = None  #: WideResNet depth (6n+4), or your factory's depth argument
    width: Optional[int] = None  #: WideResNet widen factor, small_cnn base width, or your factory's width argument
    normalize: bool = True  #: put the data set's mean/std normalisation inside the model


@dataclass
class MethodConfig:
    """Training method by name plus its own parameters (checked by the method)."""

    name: str = "pgd_at"
    params: dict = field(default_factory=dict)


@dataclass
class AttackConfig:
    """The training attack (PGD). Sizes in pixel units over 255 or 'a/b'."""

    norm: str = "linf"  #: linf | l2
    eps: PixelSize = 8  #: radius, pixel units over 255 (8 means 8/255)
    step_size: PixelSize = 2  #: PGD step, pixel units over 255
    steps: int = 10  #: PGD iterations
    random_start: bool = True  #: uniform random start inside the eps ball


@dataclass
class OptimConfig:
    """SGD with momentum and a learning-rate schedule."""

    lr: float = 0.1  #: peak learning rate of SGD
    momentum: float = 0.9  #: SGD momentum
    weight_decay: float = 5e-4  #: L2 weight decay of SGD
    nesterov: bool = False  #: Nesterov momentum
    schedule: str = "step"  #: step | cosine | constant
    milestones: list = field(default_factory=lambda: [100, 150])  #: epochs where step decay happens
    #: step-decay factor at every milestone, or one factor per milestone (the GAIRAT code's x0.1, x0.1, x0.5)
    decay: Union[float, list] = 0.1
    warmup_epochs: float = 0.0  #: linear learning-rate warmup from 0 (Goyal et al.)
    #: none: lr is the peak rate | linear: the peak is lr * batch_size / base_batch_size (Goyal et al.), batch_size
    #: being the global batch (all processes together)
    lr_scaling: str = "none"
    base_batch_size: int = 256  #: the batch size lr is given for when lr_scaling is linear


@dataclass
class TrainConfig:
    """Loop, device and bookkeeping."""

    epochs: int = 200  #: training epochs
    batch_size: int = 128  #: images per step (under torchrun: all processes together)
    seed: int = 0  #: seed of the initialisation, the data order, the augmentation and the attacks
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    #: CPU threads of PyTorch: by default all cores (or OMP/MKL_NUM_THREADS), or 1 when the machine is busy when the run
    #: starts (1-minute load average >= cores: more threads only wait for each other then); the count is written to
    #: the run's config, so that a resumed run computes exactly as before
    threads: Optional[int] = None
    #: decay of an exponential moving average of the weights (e.g. 0.999; none: off), updated after every step with
    #: the decay warmed up as min(decay, (1 + t) / (10 + t)); BatchNorm buffers are copied, not averaged. Saved in
    #: every checkpoint, evaluated beside the raw weights each epoch (ema_val_* in metrics.jsonl), used by iaat eval
    #: and iaat export unless --raw
    ema: Optional[float] = None
    #: adversarial weight perturbation (AWP, Wu et al. 2020) around the method's own loss: its gamma, the
    #: perturbation's size relative to each layer's weight norm (e.g. 0.01), or auto for the authors' defaults
    #: (0.01 from the first epoch for AT-style losses; 0.005 after 9 plain epochs for trades, mart and IAAT with
    #: train_loss=trades); none: off. Costs about one more forward and backward pass per step
    awp: Union[float, str, None] = None
    #: plain epochs before AWP starts (none: the authors' default that train.awp=auto uses)
    awp_warmup: Optional[int] = None
    amp: str = "off"  #: off | bf16 | fp16 (autocast for attacks and training)
    #: same (as amp) | off | bf16 | fp16: the attacks' autocast on its own, e.g. fp16 attacks beside an fp32 or bf16
    #: training step (the IAAT paper's ImageNet setting); fp16 attacks need no gradient scaler (see iaat.attacks.pgd)
    attack_amp: str = "same"
    #: the model's weights and activations in channels_last layout: faster convolutions with bf16/fp16 on GPUs and
    #: on CPUs with oneDNN; the attacks' tensors keep the plain layout (same random starts with it on or off)
    channels_last: bool = False
    #: torch.compile the model (its forward and backward, in the attacks and the training step) and the PGD update;
    #: the first steps pay the compile time (about half a minute), worth it on GPUs for long runs
    compile: bool = False
    eval_steps: int = 10  #: PGD steps of the end-of-epoch held-out evaluation (at attack.eps)
    eval_every: int = 1  #: evaluate every this many epochs (and always after the last)
    log_interval: int = 20  #: steps between progress-bar updates (each one syncs with the device)
    keep_checkpoints: int = 2  #: how many epoch checkpoints to keep (newest first)
    progress: bool = True  #: show progress bars
    #: on CUDA: deterministic kernels only (torch.use_deterministic_algorithms, no cuDNN autotuning,
    #: CUBLAS_WORKSPACE_CONFIG=:4096:8), so that a seed gives bitwise identical runs there too; slower
    deterministic: bool = False
    #: under torchrun on CUDA: BatchNorm statistics over the global batch (torch.nn.SyncBatchNorm) instead of
    #: each process's share of it
    sync_bn: bool = False
    #: start from these weights instead of a random initialisation (a run folder, a checkpoint, an exported
    #: .safetensors, TorchScript or .pt2 model of the same architecture): adversarial fine-tuning
    init_from: Optional[str] = None
    #: also write the epoch metrics and the per-sample radii (histograms) to RUN/tensorboard (pip install
    #: 'iaat[tensorboard]')
    tensorboard: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if name == "method":
                out[name] = {"name": section.name, **section.params}
            else:
                out[name] = dataclasses.asdict(section)
        return out

    # Convenience accessors in [0, 1] units.
    @property
    def eps(self) -> float:
        return parse_size(self.attack.eps, "attack.eps", max_unit=_max_unit(self.attack.norm))

    @property
    def step_size(self) -> float:
        return parse_size(self.attack.step_size, "attack.step_size", allow_zero=False,
                          max_unit=_max_unit(self.attack.norm))


def _max_unit(norm: str) -> float:
    # L2 radii may exceed 1 in [0, 1] units (the diagonal of a 32x32x3 image is ~55).
    return 1.0 if norm == "linf" else 64.0


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "attack": AttackConfig,
                  "optim": OptimConfig, "train": TrainConfig}


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}.")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section '{key}'.{did_you_mean(str(key), SECTIONS)} "
                              f"Sections: {', '.join(SECTIONS)}.")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}.")
        sections[name] = build_dataclass(cls, values, name)
    method_raw = raw.get("method") or {}
    if not isinstance(method_raw, dict):
        raise ConfigError(f"config section 'method' must be a mapping, got {method_raw!r}.")
    method_raw = dict(method_raw)
    method_name = method_raw.pop("name", MethodConfig.name)
    if not isinstance(method_name, str):
        raise ConfigError(f"method.name must be a string, got {method_name!r}.")
    sections["method"] = MethodConfig(name=method_name, params=method_raw)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check cross-field constraints and units; raise :class:`ConfigError` naming the problem."""
    from .data import DATASETS
    from .methods import method_class
    from .models import MODELS
    from .models.registry import check_model_args

    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.data.dataset}'.{did_you_mean(cfg.data.dataset, DATASETS)} "
                          f"Known: {', '.join(sorted(DATASETS))}.")
    if ":" in cfg.model.name:  # a user's module:factory, imported where the model is built (a saved run's config
        from .plugins import check_spec  # reads without it: reports, metrics)

        check_spec(cfg.model.name, "model.name")
    elif cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.model.name}'.{did_you_mean(cfg.model.name, MODELS)} "
                          f"Known: {', '.join(sorted(MODELS))}, or your own as module:factory.")
    check_model_args(cfg.model.name, cfg.model.depth, cfg.model.width)
    method_class(cfg.method.name)  # an unknown name first; its keys are checked last
    if cfg.attack.norm not in ("linf", "l2"):
        raise ConfigError(f"attack.norm must be 'linf' or 'l2', got {cfg.attack.norm!r}.")
    cfg.eps, cfg.step_size  # noqa: B018 -- parse to validate units
    if cfg.attack.steps < 0:
        raise ConfigError(f"attack.steps must be >= 0, got {cfg.attack.steps}.")
    if cfg.data.train_subset is not None and cfg.data.train_subset <= 0:
        raise ConfigError(f"data.train_subset must be positive, got {cfg.data.train_subset}.")
    if cfg.data.train_subset == 1:  # every step would be a batch of one: see train.batch_size below
        raise ConfigError("data.train_subset must be >= 2 (BatchNorm in train mode needs two samples per step), "
                          "got 1.")
    for key in ("image_size", "resize"):
        value = getattr(cfg.data, key)
        if value is not None and (cfg.data.dataset != "imagefolder" or value < 8):
            raise ConfigError(f"data.{key} applies to data.dataset=imagefolder only and must be >= 8, got {value} "
                              f"for {cfg.data.dataset}.")
    for name, seed in (("train.seed", cfg.train.seed), ("data.split_seed", cfg.data.split_seed)):
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise ConfigError(f"{name} must be a whole number from -2**63 to 2**64 - 1 (what torch's random number "
                              f"generators take), got {seed!r}.")
    if cfg.data.val_size < 0:
        raise ConfigError(f"data.val_size must be >= 0, got {cfg.data.val_size}.")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}.")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size must be >= 2 (BatchNorm needs two samples), got {cfg.train.batch_size}.")
    if cfg.train.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be off, bf16 or fp16, got {cfg.train.amp!r}.")
    if cfg.train.attack_amp not in ("same", "off", "bf16", "fp16"):
        raise ConfigError(f"train.attack_amp must be same, off, bf16 or fp16, got {cfg.train.attack_amp!r}.")
    if cfg.train.ema is not None and not 0.0 < cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema is the decay of the weight average, in (0, 1) (e.g. 0.999), got {cfg.train.ema}.")
    _check_awp(cfg)
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads must be >= 1, got {cfg.train.threads}.")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {cfg.train.keep_checkpoints}.")
    if cfg.train.eval_steps < 0:
        raise ConfigError(f"train.eval_steps (the held-out PGD's steps) must be >= 0, got {cfg.train.eval_steps}.")
    if cfg.train.eval_every < 1 or cfg.train.log_interval < 1:
        raise ConfigError("train.eval_every and train.log_interval must be >= 1.")
    if cfg.optim.schedule not in ("step", "cosine", "constant"):
        raise ConfigError(f"optim.schedule must be step, cosine or constant, got {cfg.optim.schedule!r}.")
    o = cfg.optim
    for ok, rule, value in ((o.lr > 0 and math.isfinite(o.lr), "optim.lr must be a finite number > 0", o.lr),
                            (o.weight_decay >= 0 and math.isfinite(o.weight_decay),
                             "optim.weight_decay must be a finite number >= 0", o.weight_decay),
                            (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)", o.momentum)):
        if not ok:  # written so that NaN fails too
            raise ConfigError(f"{rule}, got {value!r}.")
    if cfg.optim.lr_scaling not in ("none", "linear"):
        raise ConfigError(f"optim.lr_scaling must be none or linear, got {cfg.optim.lr_scaling!r}.")
    if cfg.optim.base_batch_size < 1 or cfg.optim.warmup_epochs < 0:
        raise ConfigError("optim.base_batch_size must be >= 1 and optim.warmup_epochs >= 0.")
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in cfg.optim.milestones):
        raise ConfigError(f"optim.milestones must be a list of epoch numbers >= 1, got {cfg.optim.milestones!r}.")
    decays = cfg.optim.decay if isinstance(cfg.optim.decay, list) else [cfg.optim.decay]
    if not all(isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0 for d in decays) or (
            isinstance(cfg.optim.decay, list) and len(decays) != len(cfg.optim.milestones)):
        raise ConfigError(f"optim.decay must be a positive factor or a list of one factor per milestone "
                          f"({len(cfg.optim.milestones)}), got {cfg.optim.decay!r}.")
    if not cfg.train.device == "auto" and not (cfg.train.device == "cpu" or cfg.train.device.startswith("cuda")
                                               or cfg.train.device == "mps"):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {cfg.train.device!r}.")
    build_method(cfg, num_train=1)  # last: the method's own keys (names, types, units, values)


#: Keys a resumed run may change (where and how it runs, how long); anything else must match its config.yaml.
#: A sweep compares its runs' configs with its plan without them.
RESUMABLE_KEYS = frozenset({
    ("train", "epochs"), ("train", "device"), ("train", "progress"), ("train", "log_interval"),
    ("train", "deterministic"), ("train", "channels_last"), ("train", "compile"), ("train", "tensorboard"),
    ("train", "threads"), ("data", "data_dir"), ("data", "download")})


#: Methods whose attacks take attack.step_size for every radius; IAAT's default step rule grows the step with the
#: radius, MMA sets its own (step_scale * eps / steps), clean training has no attack.
_FIXED_STEP_METHODS_EXCLUDED = ("clean", "mma")


def notes(cfg: Config) -> list[str]:
    """What a run with ``cfg`` does that its settings may not have meant (printed when training starts).

    >>> from iaat.config import Config, notes
    >>> cfg = Config(); cfg.attack.eps = 64
    >>> notes(cfg)[0][:80]
    'attack: 10 steps of 2/255 cover at most 20/255 of the 64/255 radius, so the trai'
    """
    said = []
    if 0 < cfg.train.epochs <= cfg.optim.warmup_epochs:
        said.append(f"optim: the learning-rate warmup ({cfg.optim.warmup_epochs} epochs) lasts the whole run "
                    f"({cfg.train.epochs} epochs): the learning rate never reaches optim.lr={cfg.optim.lr:g}")
    steps, step, eps = cfg.attack.steps, cfg.step_size, cfg.eps
    if steps == 0 and cfg.method.name != "clean":
        said.append("attack: attack.steps=0 trains on the attack's random start alone (noise in the eps ball), "
                    "without a gradient step")
    proportional = cfg.method.name == "iaat" and cfg.method.params.get("step_rule", "proportional") == "proportional"
    if cfg.method.name not in _FIXED_STEP_METHODS_EXCLUDED and not proportional and 0 < steps * step < eps:
        said.append(f"attack: {steps} steps of {format_size(step)} cover at most {format_size(steps * step)} of the "
                    f"{format_size(eps)} radius, so the training attack stays well inside it; the usual step is "
                    f"2.5 * eps / steps (--set attack.step_size={255 * 2.5 * eps / steps:.4g})")
    return said


def method_kwargs(cfg: Config) -> dict:
    """The keyword arguments of the run's method class: the training attack, ``epochs`` and the method's own keys,
    every size converted from the config's pixel units to [0, 1] units (where a method's sizes enter)."""
    from .methods import method_class
    from .methods.base import own_fields

    cls = method_class(cfg.method.name)
    own = {f.name: f for f in own_fields(cls)}
    raw = cfg.method.params
    lost = [key for key in raw if key not in own and any(key in inspect.get_annotations(c) for c in cls.__mro__)]
    if lost:  # declared on a class that is no dataclass: a class attribute that no config reaches
        raise ConfigError(f"method.name {cfg.method.name}: {cls.__name__} declares {', '.join(lost)} but not as a "
                          f"dataclass field; put @dataclass(eq=False, kw_only=True) above it (see "
                          f"examples/own_method.py).")
    if raw and not own:
        raise ConfigError(f"method '{cls.name or cfg.method.name}' takes no parameters, got {', '.join(sorted(raw))}.")
    check_keys(raw, own, "method")
    kwargs = {}
    for key, value in raw.items():
        if own[key].metadata.get("size") and value is not None:
            value = parse_size(value, f"method.{key}", max_unit=_max_unit(cfg.attack.norm))
        kwargs[key] = value
    return {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.attack.steps, "norm": cfg.attack.norm,
            "random_start": cfg.attack.random_start, "epochs": cfg.train.epochs, **kwargs}


def _check_awp(cfg: Config) -> None:
    awp = cfg.train.awp
    if awp is None:
        if cfg.train.awp_warmup is not None:
            raise ConfigError("train.awp_warmup applies with train.awp only (set train.awp=auto or a gamma like 0.01).")
        return
    if isinstance(awp, str) and awp != "auto":
        raise ConfigError(f"train.awp must be auto (the authors' gamma and warm-up) or a gamma like 0.01, got {awp!r}.")
    if not isinstance(awp, str) and not 0.0 < awp < 1.0:
        raise ConfigError(f"train.awp (the AWP gamma) must be in (0, 1), e.g. 0.01 (AT-style) or 0.005 (TRADES-style), "
                          f"got {awp}.")
    if cfg.train.awp_warmup is not None and cfg.train.awp_warmup < 0:
        raise ConfigError(f"train.awp_warmup must be >= 0, got {cfg.train.awp_warmup}.")
    if cfg.method.name == "clean":
        from .methods import METHODS

        raise ConfigError("train.awp perturbs the weights against an adversarial loss, which method clean does not "
                          f"have; it works with {', '.join(m for m in METHODS if m != 'clean')}.")


def build_method(cfg: Config, num_train: int, *, attack_dtype: Optional[Any] = None, compiled: bool = False):
    """The run's :class:`~iaat.methods.Method` for a training set of ``num_train`` samples.

    ``attack_dtype`` and ``compiled`` are the attacks' precision and ``torch.compile`` switch (the
    trainer's ``train.attack_amp`` and ``train.compile``).
    """
    from .methods import method_class

    return method_class(cfg.method.name)(**method_kwargs(cfg), num_train=num_train, attack_dtype=attack_dtype,
                                         compiled=compiled)


def method_params(cfg: Config) -> dict:
    """The method's own keys with their defaults filled in, sizes in [0, 1] units (what reports compare)."""
    return build_method(cfg, num_train=1).own_params()


def load_yaml(path: Union[str, Path]) -> dict:
    """Read a YAML config file safely (no Python objects), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:  # one line: the problem and where
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or first_line(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}.")
    return raw


def key_lines(path: Union[str, Path]) -> dict:
    """Line numbers (1-based) of a YAML config's keys: ``{(section, None): n, (section, key): n}``."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    lines: dict = {}
    if isinstance(root, yaml.MappingNode):
        for sec_node, body in root.value:
            lines[(str(sec_node.value), None)] = sec_node.start_mark.line + 1
            if isinstance(body, yaml.MappingNode):
                for key_node, _ in body.value:
                    lines[(str(sec_node.value), str(key_node.value))] = key_node.start_mark.line + 1
    return lines


def locate(error: ConfigError, path: Union[str, Path], final: Optional[dict] = None) -> ConfigError:
    """``error`` prefixed with ``FILE, line N:`` when the key it names was written in the config file ``path`` (and,
    given the ``final`` raw config, still holds the file's value there: a flag or ``--set`` that replaced it is to
    blame, not the file)."""
    import re

    lines = key_lines(path)
    written = load_yaml(path) if final is not None else {}

    def from_file(section: str, key: str) -> bool:
        if final is None:
            return True
        mine = (written.get(section) or {}) if isinstance(written.get(section), dict) else {}
        theirs = (final.get(section) or {}) if isinstance(final.get(section), dict) else {}
        return mine.get(key) == theirs.get(key)

    for section, key in re.findall(r"\b(" + "|".join(SECTIONS) + r"|[a-z_]+)\.([a-z_]+)\b", str(error)):
        if (section, key) in lines and from_file(section, key):
            return ConfigError(f"{path}, line {lines[(section, key)]}: {error}")
    for section in re.findall(r"config section '([^']+)'", str(error)):
        if (section, None) in lines:
            return ConfigError(f"{path}, line {lines[(section, None)]}: {error}")
    return error


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` override in place (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}.")
    path, _, text = assignment.partition("=")
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. attack.eps=8), got {assignment!r}.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    set_key(raw, *parts, value, f"--set {assignment!r}")


def set_key(raw: dict, section: str, key: str, value: Any, where: str) -> None:
    """Set ``raw[section][key] = value`` (None included, as an empty ``--set`` value gives: right for the keys that
    may be null); ``where`` names the override in errors."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}' in {where}.{did_you_mean(section, SECTIONS)}")
    _section(raw, section)[key] = value


def merge(raw: dict, section: str, key: str, value: Any) -> None:
    """Set ``raw[section][key] = value`` unless value is None (an unset CLI flag)."""
    if value is None:
        return
    _section(raw, section)[key] = value


def _section(raw: dict, section: str) -> dict:
    """``raw[section]``, created when missing; a config file's non-mapping section is an error, not a crash."""
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {raw[section]!r}.")
    return raw[section]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe(cfg: Config) -> str:
    """The effective config as YAML, every key with its value (the default unless set) and a comment that says
    what it means; sizes in pixel units over 255, so the text can be passed back with ``--config``."""
    from .methods import METHODS, method_class
    from .methods.base import own_fields
    from .schema import field_default, field_docs

    lines = ["# iaat train: every config key, its value here (the default unless set) and what it means.",
             "# Sizes are in pixel units over 255 (8 means 8/255) or 'a/b'. Save this and pass it back with --config.",
             ""]
    raw = cfg.to_dict()
    cls = method_class(cfg.method.name)
    method = {"name": cfg.method.name}
    for f in own_fields(cls):
        default = field_default(f)
        if f.metadata.get("size") and isinstance(default, float):
            default = float(f"{default * 255:.6g}")  # the config form of a [0, 1] default
        method[f.name] = cfg.method.params.get(f.name, default)
    raw["method"] = method
    sizes = {f.name for f in own_fields(cls) if f.metadata.get("size")}
    docs = {name: field_docs(kind) for name, kind in _SECTION_TYPES.items()}
    docs["method"] = {"name": "the training method: " + ", ".join(sorted(METHODS)) + "; or your own as module:Class",
                      **field_docs(cls)}
    for section in SECTIONS:
        lines.append(f"{section}:")
        for key, value in raw[section].items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
            doc = docs[section].get(key, "")
            if section == "method" and key in sizes:
                doc += " [a size: pixel units over 255]"
            lines.append(f"  {text}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"
