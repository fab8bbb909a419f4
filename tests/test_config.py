"""Perturbation-size units and config validation."""

from __future__ import annotations

import math

import pytest

from iaat.config import Config, apply_override, config_from_dict, dump_yaml, load_yaml
from iaat.errors import ConfigError
from iaat.units import format_size, parse_size

# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("value,expected", [
    (8, 8 / 255), (8.0, 8 / 255), ("8", 8 / 255), (" 8 ", 8 / 255), ("8/255", 8 / 255), ("0.031/1", 0.031),
    (0, 0.0), ("0/1", 0.0), (255, 1.0), ("1/1", 1.0), (2, 2 / 255), (0.5, 0.5 / 255), ("16/510", 8 / 255),
])
def test_parse_size_values(value, expected):
    assert parse_size(value) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("value", [-1, -8.0, "-8", "-8/255", "8/-255"])
def test_parse_size_negative_raises(value):
    with pytest.raises(ConfigError, match="negative|denominator"):
        parse_size(value)


@pytest.mark.parametrize("value", [0.031, 0.0314, "0.031", 0.1])
def test_parse_size_unit_mistake_suggests_fix(value):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "attack.eps")
    message = str(info.value)
    assert "attack.eps" in message and "[0, 1] units" in message
    assert f"'{value}/1'" in message  # the explicit spelling if the small value is really meant
    assert f"{float(value) * 255:g}" in message  # the pixel-unit spelling of the same size


@pytest.mark.parametrize("value", [300, 256, "300", "2/1"])
def test_parse_size_too_large_raises(value):
    with pytest.raises(ConfigError, match="larger than"):
        parse_size(value)


def test_parse_size_max_unit_allows_large_l2_radii():
    assert parse_size(300, max_unit=64.0) == pytest.approx(300 / 255)
    with pytest.raises(ConfigError, match="larger than"):
        parse_size(300 * 65, max_unit=64.0)


@pytest.mark.parametrize("value", ["abc", "eight", "8px", "a/b", "8/x", "", "8/0", "8/255/2", None, [8], True,
                                   float("nan"), float("inf"), "inf"])
def test_parse_size_rejects_non_sizes(value):
    with pytest.raises(ConfigError):
        parse_size(value)


def test_parse_size_zero_can_be_forbidden():
    assert parse_size(0) == 0.0
    with pytest.raises(ConfigError, match="positive"):
        parse_size(0, "attack.step_size", allow_zero=False)


@pytest.mark.parametrize("pixels", [2, 8, 16, 0.5])
def test_format_size_round_trips(pixels):
    assert parse_size(format_size(pixels / 255)) == pytest.approx(pixels / 255)
    assert format_size(pixels / 255) == f"{pixels:g}/255"


# --------------------------------------------------------------------------- config_from_dict


@pytest.mark.parametrize("raw", [{}, None, {"data": None, "attack": {}}])
def test_defaults_are_valid(raw):
    cfg = config_from_dict(raw)
    assert isinstance(cfg, Config)
    assert cfg.eps == pytest.approx(8 / 255) and cfg.step_size == pytest.approx(2 / 255)
    assert cfg.method.name == "pgd_at" and cfg.model.name == "resnet18" and cfg.data.dataset == "cifar10"
    assert cfg.optim.milestones == [100, 150]


def test_to_dict_round_trips():
    raw = {"data": {"dataset": "digits", "val_size": 100}, "attack": {"eps": "4/255", "steps": 3},
           "optim": {"milestones": [5, 9]}, "method": {"name": "clean"}}
    cfg = config_from_dict(raw)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.data.dataset == "digits" and again.attack.steps == 3 and again.method.name == "clean"
    assert "eps: 4/255" in dump_yaml(cfg)


@pytest.mark.parametrize("raw,suggestion", [
    ({"atack": {}}, "attack"),
    ({"optimizer": {}}, "optim"),
    ({"xyz": {}}, None),
    ({"attack": {"epss": 8}}, "eps"),
    ({"train": {"epoch": 3}}, "epochs"),
    ({"data": {"dataset_name": "digits"}}, "dataset"),
    ({"data": {"colour": 1}}, None),
])
def test_unknown_section_or_key_raises_with_suggestion(raw, suggestion):
    with pytest.raises(ConfigError, match="unknown") as info:
        config_from_dict(raw)
    message = str(info.value)
    if suggestion is None:
        assert "Did you mean" not in message
    else:
        assert f"Did you mean '{suggestion}'?" in message


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"attack": {"radius": 8}})
    assert "attack.radius" in str(info.value)
    for key in ("norm", "eps", "step_size", "steps", "random_start"):
        assert key in str(info.value)


@pytest.mark.parametrize("raw", [
    {"train": {"epochs": "ten"}},
    {"train": {"epochs": 1.5}},
    {"train": {"batch_size": True}},
    {"data": {"augment": "yes"}},
    {"data": {"augment": 1}},
    {"data": {"val_size": None}},
    {"attack": {"eps": [8]}},
    {"attack": {"eps": True}},
    {"attack": {"eps": None}},
    {"attack": {"steps": "10"}},
    {"optim": {"lr": "fast"}},
    {"optim": {"milestones": 5}},
    {"optim": {"milestones": ["a"]}},
    {"model": {"name": 3}},
    {"method": {"name": 3}},
    {"data": "cifar10"},
    {"method": "pgd_at"},
    ["data"],
])
def test_wrong_types_raise(raw):
    with pytest.raises(ConfigError):
        config_from_dict(raw)


def test_lenient_coercions():
    cfg = config_from_dict({"optim": {"weight_decay": "5e-4", "lr": 1}, "train": {"epochs": 10.0},
                            "data": {"train_subset": None}})
    assert cfg.optim.weight_decay == 5e-4 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 10 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize("raw,match", [
    ({"method": {"name": "gairat_typo"}}, "unknown method"),
    ({"method": {"name": "pgd-at"}}, "Did you mean 'pgd_at'"),
    ({"model": {"name": "resnet-18"}}, "unknown model"),
    ({"model": {"name": "resnet19"}}, "Did you mean 'resnet18'"),
    ({"data": {"dataset": "imagenet"}}, "unknown dataset"),
    ({"data": {"dataset": "cifar11"}}, "Did you mean 'cifar10'"),
    ({"method": {"name": "pgd_at", "beta": 6.0}}, "takes no parameters"),
])
def test_unknown_registry_names_raise(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


@pytest.mark.parametrize("raw,match", [
    ({"attack": {"eps": 0.031}}, "attack.eps"),
    ({"attack": {"eps": 300}}, "larger than"),
    ({"attack": {"step_size": 0}}, "attack.step_size"),
    ({"attack": {"norm": "l1"}}, "attack.norm"),
    ({"attack": {"steps": -1}}, "attack.steps"),
    ({"train": {"batch_size": 1}}, "batch_size"),
    ({"train": {"amp": "fp8"}}, "train.amp"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule"),
    ({"optim": {"momentum": 1.0}}, "momentum"),
    ({"optim": {"milestones": [1.5]}}, "milestones"),
    ({"optim": {"milestones": [-1]}}, "milestones must be a list of epoch numbers >= 1"),
    ({"train": {"seed": 2**64}}, r"train.seed must be a whole number from -2\*\*63 to 2\*\*64 - 1"),
    ({"data": {"split_seed": -(2**63) - 1}}, "data.split_seed"),
    ({"data": {"val_size": -1}}, "val_size"),
    ({"data": {"train_subset": 0}}, "train_subset"),
])
def test_invalid_values_raise(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_l2_radius_may_exceed_one():
    cfg = config_from_dict({"attack": {"norm": "l2", "eps": "0.5/1", "step_size": "0.1/1"}})
    assert cfg.eps == 0.5
    cfg = config_from_dict({"attack": {"norm": "l2", "eps": "2/1", "step_size": "0.1/1"}})
    assert cfg.eps == 2.0
    assert config_from_dict({"attack": {"norm": "l2", "eps": 127.5, "step_size": 25.5}}).eps == 0.5
    with pytest.raises(ConfigError, match=r"attack.eps=0.5 means 0.5/255.*Write 127.5"):  # the usual L2 radius
        config_from_dict({"attack": {"norm": "l2", "eps": 0.5, "step_size": "0.1/1"}})


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("assignment,section,key,value", [
    ("attack.eps=8/255", "attack", "eps", "8/255"),
    ("attack.eps=4", "attack", "eps", 4),
    ("optim.milestones=[1,2]", "optim", "milestones", [1, 2]),
    ("optim.milestones=[1, 2, 3]", "optim", "milestones", [1, 2, 3]),
    ("data.augment=false", "data", "augment", False),
    ("data.train_subset=null", "data", "train_subset", None),
    ("data.data_dir=", "data", "data_dir", None),
    ("optim.lr=0.05", "optim", "lr", 0.05),
    ("method.beta=6.0", "method", "beta", 6.0),
])
def test_apply_override_parses_yaml_values(assignment, section, key, value):
    raw = {}
    apply_override(raw, assignment)
    assert raw == {section: {key: value}}


def test_overrides_feed_config_from_dict():
    raw = {"attack": None}
    for assignment in ("attack.eps=8/255", "optim.milestones=[1,2]", "attack.step_size=0.5/255", "train.epochs=3"):
        apply_override(raw, assignment)
    cfg = config_from_dict(raw)
    assert cfg.eps == pytest.approx(8 / 255) and cfg.step_size == pytest.approx(0.5 / 255)
    assert cfg.optim.milestones == [1, 2] and cfg.train.epochs == 3


def test_override_of_existing_value_replaces_it():
    raw = {"attack": {"eps": 8, "steps": 10}}
    apply_override(raw, "attack.eps=16")
    assert raw == {"attack": {"eps": 16, "steps": 10}}


@pytest.mark.parametrize("assignment,match", [
    ("attack.eps", "section.key=value"),
    ("attack=8", "section.key=value"),
    ("attack.eps.x=8", "section.key=value"),
    (".eps=8", "section.key=value"),
    ("atack.eps=8", "Did you mean 'attack'"),
])
def test_bad_overrides_raise(assignment, match):
    with pytest.raises(ConfigError, match=match):
        apply_override({}, assignment)


def test_override_with_unknown_key_is_caught_by_validation():
    raw = {}
    apply_override(raw, "attack.epss=8")
    with pytest.raises(ConfigError, match="Did you mean 'eps'"):
        config_from_dict(raw)


# --------------------------------------------------------------------------- YAML files


def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("attack:\n  eps: 8/255\n  steps: 7\noptim:\n  weight_decay: 5e-4\n")
    raw = load_yaml(path)
    assert raw == {"attack": {"eps": "8/255", "steps": 7}, "optim": {"weight_decay": "5e-4"}}
    cfg = config_from_dict(raw)
    assert cfg.attack.steps == 7 and math.isclose(cfg.optim.weight_decay, 5e-4)


@pytest.mark.parametrize("content,match", [
    ("- a\n- b\n", "mapping"),
    ("attack: [unclosed\n", r"not valid YAML \(line 2, column 1\): expected ',' or ']', but got '<stream end>'$"),
    (b"\xff\xfe\x00bad", "not a text file"),
])
def test_load_yaml_bad_files_raise(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)


def test_load_yaml_missing_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:subprocess.call"])
def test_load_yaml_refuses_python_objects(tmp_path, tag):
    marker = tmp_path / "pwned"
    args = f'["touch {marker}"]' if tag.endswith("os.system") else f'[["touch", "{marker}"]]'
    path = tmp_path / "evil.yaml"
    path.write_text(f"attack:\n  eps: {tag} {args}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    assert not marker.exists()


# ---- learning-rate schedule: warmup and linear scaling with the (global) batch ----------------------------------

def test_lr_linear_scaling_and_warmup():
    from iaat.config import OptimConfig
    from iaat.engine.schedule import lr_at, peak_lr

    optim = OptimConfig(lr=0.1, schedule="step", milestones=[35, 70, 95], decay=0.1, warmup_epochs=5,
                        lr_scaling="linear", base_batch_size=256)
    assert peak_lr(optim, 1024) == pytest.approx(0.4)
    assert lr_at(optim, 0.0, 110, 1024) == 0.0
    assert lr_at(optim, 2.5, 110, 1024) == pytest.approx(0.2)  # half way through the warmup
    assert lr_at(optim, 10, 110, 1024) == pytest.approx(0.4)
    assert lr_at(optim, 40, 110, 1024) == pytest.approx(0.04)
    assert lr_at(optim, 100, 110, 1024) == pytest.approx(0.0004)
    plain = OptimConfig(lr=0.1)
    assert lr_at(plain, 10, 110, 1024) == pytest.approx(0.1)  # lr_scaling none: batch size ignored
    with pytest.raises(ValueError, match="batch size"):
        peak_lr(optim)


def test_a_warmup_as_long_as_the_run_is_named():
    from iaat.config import notes

    assert notes(config_from_dict({"train": {"epochs": 10}, "optim": {"warmup_epochs": 5}})) == []
    (note,) = notes(config_from_dict({"train": {"epochs": 3}, "optim": {"warmup_epochs": 5}}))
    assert "lasts the whole run (3 epochs)" in note


@pytest.mark.parametrize("key,value,match", [("optim.lr_scaling", "sqrt", "lr_scaling"),
                                             ("optim.base_batch_size", 0, "base_batch_size"),
                                             ("train.sync_bn", "yes", "sync_bn")])
def test_bad_scaling_keys_are_clear_errors(key, value, match):
    from iaat.config import config_from_dict

    section, name = key.split(".")
    with pytest.raises(ConfigError, match=match):
        config_from_dict({section: {name: value}})


def test_every_key_has_a_description_for_print_config():
    """``--print-config`` and the reference docs read each key's meaning from ``#:`` comments and docstrings'
    ``Args:`` sections (a header over two lines included, as MMA's)."""
    import dataclasses

    from iaat.config import _SECTION_TYPES
    from iaat.methods import METHODS
    from iaat.methods.base import own_fields
    from iaat.schema import field_docs

    kinds = {f"method {name}": (cls, own_fields(cls)) for name, cls in METHODS.items()}
    kinds.update({section: (kind, dataclasses.fields(kind)) for section, kind in _SECTION_TYPES.items()})
    missing = {what: [f.name for f in fields if not field_docs(kind).get(f.name)] for what, (kind, fields) in
               kinds.items()}
    assert not any(missing.values()), missing
    assert field_docs(METHODS["mma"])["min_eps"].startswith("smallest radius an attack starts from")


def test_notes_say_when_the_training_attack_is_not_what_its_settings_suggest():
    from iaat.config import Config, notes

    cfg = Config()
    assert notes(cfg) == []
    cfg.attack.steps = 0
    assert "trains on the attack's random start alone" in notes(cfg)[0]
    cfg.attack.steps, cfg.attack.eps = 10, 64
    assert "cover at most 20/255 of the 64/255 radius" in notes(cfg)[0] and "step_size=16" in notes(cfg)[0]
    cfg.attack.step_size = 16
    assert notes(cfg) == []
    cfg.attack.step_size, cfg.method.name = 2, "iaat"  # IAAT's default step rule grows the step with the radius
    assert notes(cfg) == []


def test_split_notes_say_when_the_held_out_set_outweighs_training():
    """digits (1,497 training images) with the default data.val_size of 1,000 trains on 497: said at the start."""
    from iaat.config import Config
    from iaat.engine.setup import prepare_data, split_notes

    cfg = Config()
    cfg.data.dataset = "digits"
    (note,) = split_notes(cfg, prepare_data(cfg))
    assert "data.val_size=1000 holds out more images than training keeps (497 of 1497)" in note
    cfg.data.val_size = 197
    assert split_notes(cfg, prepare_data(cfg)) == []
    cfg.data.val_size, cfg.data.train_subset = 1000, 200  # a chosen training size: nothing to say
    assert split_notes(cfg, prepare_data(cfg)) == []
