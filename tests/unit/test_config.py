"""Typed config: presets, typo suggestions, type and value validation, YAML round trip."""

from __future__ import annotations

import dataclasses
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml

from lmdistill.config import Config, ConfigError, leaf_fields, load_yaml, reference_markdown
from lmdistill.core.errors import LmdistillError

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def _preset_param(path: Path):
    return pytest.param(path, id=path.name)


def all_keys() -> list[tuple[str, str]]:
    """(section, key) of every settable key, subsection keys as 'hidden.weight'."""
    cfg = Config()
    return [(s.name, dotted) for s in dataclasses.fields(cfg) for dotted, _ in leaf_fields(getattr(cfg, s.name))]


# ---- presets -------------------------------------------------------------------------------


def test_there_are_presets():
    assert PRESETS, f"no YAML presets in {REPO / 'configs'}; every shipped preset is loaded by the tests below"


@pytest.mark.parametrize("path", [_preset_param(p) for p in PRESETS])
def test_preset_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, f"{path.name} is empty"
    cfg = Config.load(path)
    # every key in the file reached the config (nothing silently dropped)
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, float) or isinstance(got, float):
                assert float(got) == pytest.approx(float(value)), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be a comment holding the command, got {first!r}"
    words = shlex.split(first[2:], comments=False)
    assert words[0] in ("lmdistill", "python", "accelerate"), first
    assert f"--config configs/{path.name}" in first, f"{path.name}: the command must name its own file: {first!r}"


# ---- unknown keys and suggestions ----------------------------------------------------------


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("distill.temprature", "distill.temperature"),
        ("distill.temperture", "distill.temperature"),
        ("train.lr_schedul", "train.lr_schedule"),
        ("data.blocksize", "data.block_size"),
    ],
)
def test_typo_suggests_the_nearest_key(key, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; did you mean '{suggestion}'"):
        Config().set(key, 1)


def test_typo_in_a_section_name_suggests_the_section():
    with pytest.raises(ConfigError, match=r"did you mean 'distill'"):
        Config.from_dict({"distil": {"temperature": 3.0}})


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("train.temperature", "distill.temperature"),
        ("data.kd_weight", "distill.kd_weight"),
        ("run.warmup_steps", "train.warmup_steps"),
    ],
)
def test_right_key_in_wrong_section_suggests_the_right_section(key, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean '{suggestion}'"):
        Config().set(key, 1)


def test_batch_size_in_model_section_suggests_train_batch_size():
    with pytest.raises(ConfigError, match=r"did you mean 'train.batch_size'"):
        Config().set("model.batch_size", 2)


def test_every_key_in_every_wrong_section_suggests_its_own_section():
    keys = all_keys()
    owners: dict[str, set[str]] = {}
    for section, leaf in keys:
        owners.setdefault(leaf, set()).add(section)
    wrong = []
    for section in {s for s, _ in keys}:
        for leaf, sections in owners.items():
            if section in sections:
                continue
            try:
                Config().set(f"{section}.{leaf}", None)
            except ConfigError as exc:
                if not any(f"did you mean '{s}.{leaf}'" in str(exc) for s in sections):
                    wrong.append(f"{section}.{leaf}: {exc}")
            else:
                wrong.append(f"{section}.{leaf}: accepted")
    assert not wrong, f"{len(wrong)} wrong suggestions, e.g. {wrong[:3]}"


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, LmdistillError)


# ---- types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.batch_size", "eight", "expected a whole number"),
        ("train.batch_size", 2.5, "expected a whole number"),
        ("train.batch_size", True, "expected a whole number"),
        ("train.batch_size", None, "expected a whole number"),
        ("run.overwrite", "yes", "expected true or false"),
        ("distill.temperature", "hot", "expected a number"),
        ("train.betas", 0.9, "expected a list"),
        ("model.student_config", [1, 2], "expected a mapping"),
        (
            "distill.divergence",
            "kl",
            "choose one of 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl', 'skew_reverse_kl', 'tvd'",
        ),
        ("run.device", "tpu", "choose one of"),
    ],
)
def test_wrong_types_are_rejected_naming_key_and_value(key, value, expected):
    with pytest.raises(ConfigError) as info:
        Config().set(key, value)
    message = str(info.value)
    assert key in message and repr(value) in message and expected in message


def test_harmless_conversions():
    cfg = Config()
    cfg.set("train.lr", "1e-3")  # YAML 1.1 reads 1e-3 as a string
    cfg.set("train.batch_size", 4.0)
    cfg.set("distill.temperature", 3)
    cfg.set("train.max_steps", None)
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.distill.temperature == 3.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.train.max_steps is None


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.batch_size", "8", "expected a whole number"),  # a quoted number stays a string
        ("train.lr", True, "expected a number"),
        ("train.lr", 10**400, "expected a number"),  # too large for a float: one line, not an OverflowError
        ("train.max_steps", "abc", "expected a whole number"),  # a union names its type other than None
        ("run.name", True, "expected a string"),
        ("train.betas", (0.9, 0.95), "expected a list"),
        ("distill.hidden.layers", {}, "expected a string"),
        ("model.teacher", b"x", "expected a string"),
    ],
)
def test_lax_conversions_that_would_hide_a_mistake_are_refused(key, value, expected):
    with pytest.raises(ConfigError) as info:
        Config().set(key, value)
    message = str(info.value)
    assert message.startswith(f"{key} = ") and expected in message and "\n" not in message


def test_every_field_is_typed_with_the_configs_value_types():
    """pydantic's plain bool, int or str would take 'yes', True or bytes: each field uses the config's types."""
    from lmdistill import config

    allowed = {config.Bool, config.Int, config.Float, config.Str, config.List, config.Dict}
    allowed |= {config.Precision, config.Switch}  # literals that also take what YAML 1.1 reads as booleans
    wrong = []
    for dotted, f in leaf_fields(Config()):
        owner = Config()
        for name in dotted.split(".")[:-1]:
            owner = getattr(owner, name)
        hint = typing.get_type_hints(type(owner), include_extras=True)[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        for arm in typing.get_args(hint) if union else (hint,):
            if arm is not type(None) and arm not in allowed and typing.get_origin(arm) is not typing.Literal:
                wrong.append(f"{dotted}: {arm}")
    assert not wrong, wrong


def test_mixed_precision_no_unquoted_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  mixed_precision: no\n")
    assert Config.load(path).run.mixed_precision == "no"
    assert Config.load(overrides=["run.mixed_precision=no"]).run.mixed_precision == "no"


def test_mixed_precision_no_quoted_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  mixed_precision: 'no'\n")
    assert Config.load(path).run.mixed_precision == "no"


def test_yaml_scientific_notation_loads_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert Config.load(path).train.lr == pytest.approx(1e-3)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        Config.from_dict({"distill": 3.0})


# ---- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["distill.temperature=0"], "distill.temperature"),
        (["distill.temperature=-1"], "distill.temperature"),
        (["distill.temperature=.inf"], "distill.temperature"),
        (["distill.min_temperature=0"], "distill.min_temperature"),
        (["distill.kd_weight=1.5"], "distill.kd_weight"),
        (["distill.kd_weight=-0.1"], "distill.kd_weight"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.lr=0"], "train.lr"),
        (["data.block_size=1"], "data.block_size"),
        (["data.eval_fraction=1.0"], "data.eval_fraction"),
        (["train.betas=[0.9]"], "train.betas"),
        (["guard.spike_factor=1.0"], "guard.spike_factor"),
        (["distill.jsd_beta=1.5"], "distill.jsd_beta = 1.5 is not allowed: must be in [0, 1]"),
        (["distill.skew_alpha=1"], "distill.skew_alpha = 1.0 is not allowed: must be in [0, 1)"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        Config.load(overrides=overrides)


def test_min_temperature_above_temperature_is_rejected():
    with pytest.raises(ConfigError, match=r"min_temperature = 2.5 is above distill.temperature = 2.0"):
        Config.load(overrides=["distill.min_temperature=2.5"])
    # equal is allowed (constant temperature), and the boundaries of kd_weight too
    cfg = Config.load(overrides=["distill.temperature=3", "distill.min_temperature=3", "distill.kd_weight=1"])
    assert cfg.distill.min_temperature == cfg.distill.temperature == 3.0
    assert Config.load(overrides=["distill.kd_weight=0"]).distill.kd_weight == 0.0


def test_defaults_validate_and_match_the_seed():
    cfg = Config.load()
    assert cfg.distill.temperature == 2.0 and cfg.distill.min_temperature == 1.5
    assert cfg.distill.scale_by_t2 is True


# ---- files and overrides -------------------------------------------------------------------


def test_invalid_yaml_is_a_config_error_with_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        Config.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert Config.load(path).to_dict() == Config().to_dict()


def test_set_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        Config.load(overrides=["distill.temperature"])
    with pytest.raises(ConfigError, match="key=value"):
        Config.load(overrides=["=3"])


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  temperature: 4.0\n  min_temperature: 1.0\ntrain:\n  betas: [0.9, 0.99]\n")
    cfg = Config.load(path, overrides=["distill.temperature=5", "train.betas=[0.8, 0.9]", "run.output_dir="])
    assert cfg.distill.temperature == 5.0
    assert cfg.distill.min_temperature == 1.0
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.run.output_dir is None


# ---- debug.inject --------------------------------------------------------------------------


def test_valid_injection_passes():
    cfg = Config.from_dict(
        {
            "debug": {
                "inject": [
                    {"step": 3, "where": "loss", "value": "nan"},
                    {"step": 0, "where": "grad", "value": "-inf", "rank": 1},
                ],
                "loss_multiplier": {30: 4.0},
            }
        }
    )
    cfg.validate()


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"step": 3, "where": "logits", "value": "nan"}, r"where = 'logits' must be one of"),
        ({"step": 3, "where": "loss", "value": "zero"}, r"value = 'zero' must be nan, inf or -inf"),
        ({"step": -1, "where": "loss"}, r"step = -1 must be a step number >= 0"),
        ({"step": "3", "where": "loss"}, r"step = '3' must be a step number"),
        ({"step": 3, "where": "loss", "when": 1}, r"debug.inject\[0\]"),
        ("step 3", r"debug.inject\[0\]"),
    ],
)
def test_invalid_injection_is_rejected(entry, match):
    cfg = Config.from_dict({"debug": {"inject": [entry]}})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_invalid_loss_multiplier_is_rejected():
    cfg = Config.from_dict({"debug": {"loss_multiplier": {"thirty": 4.0}}})
    with pytest.raises(ConfigError, match="loss_multiplier"):
        cfg.validate()


# ---- reference and round trip --------------------------------------------------------------


def test_every_field_has_a_doc_line():
    for dotted, f in leaf_fields(Config()):
        assert f.metadata.get("doc", "").strip(), f"{dotted} has no documentation"


def test_reference_markdown_lists_every_field():
    text = reference_markdown()
    keys = all_keys()
    assert len(keys) > 40
    for section, key in keys:
        assert f"## `{section}`" in text
        assert f"| `{section}.{key}` |" in text, f"{section}.{key} missing from the reference"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(keys)


def test_to_yaml_round_trips():
    cfg = Config.load(
        overrides=[
            "distill.temperature=3.5",
            "distill.divergence=jsd",
            "train.betas=[0.8, 0.99]",
            "model.student_config={num_hidden_layers: 2, hidden_size: 64}",
            "train.max_steps=17",
            "debug.inject=[{step: 2, where: loss, value: nan}]",
            "debug.loss_multiplier={5: 3.0}",
            "run.output_dir=/tmp/x",
            "health.ppl_max=1e6",
            "distill.hidden.layers=[[0, 1]]",
            "model.prune.layers=uniform",
        ]
    )
    text = cfg.to_run_yaml()
    again = Config.from_dict(yaml.safe_load(text))
    assert again.to_dict() == cfg.to_dict()  # (run.overwrite and run.resume are off in both)
    assert again.validate() is again
    assert again.to_dict() != Config().to_dict()  # the overrides survived, not just the defaults
    assert again.distill.divergence == "jsd" and again.debug.loss_multiplier == {5: 3.0}
    assert again.distill.hidden.layers == [[0, 1]] and again.model.prune.layers == "uniform"


def test_docs_config_reference_is_up_to_date():
    """docs/config.md is generated by `lmdistill config-reference`; regenerate it when a field changes."""
    from lmdistill.config import reference_markdown

    assert (REPO / "docs" / "config.md").read_text().strip() == reference_markdown().strip()


def test_saved_run_config_resumes_even_after_overwrite(tmp_path):
    """A run started with --overwrite saves a config that --resume can load (no contradiction)."""
    cfg = Config.load(None, ["run.overwrite=true", f"run.output_dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_run_yaml())
    resumed = Config.load(saved, [], {"run.resume": True})
    assert resumed.run.resume and not resumed.run.overwrite


# ---- hostile values: non-finite numbers, ranges, names, files --------------------------------


def _float_keys() -> list[str]:
    from lmdistill.config import _float_values

    return [key for key, _ in _float_values(Config())]


def test_every_float_key_is_checked_for_nan_and_infinity():
    keys = _float_keys()
    assert "guard.spike_factor" in keys and "distill.hidden.weight" in keys and "train.max_grad_norm" in keys
    accepted = []
    for key in keys:
        for raw in (".nan", ".inf", "-.inf"):
            try:
                Config.load(overrides=[f"{key}={raw}"])
            except ConfigError as exc:
                assert key in str(exc) and "\n" not in str(exc), str(exc)
            else:
                accepted.append(f"{key}={raw}")
    assert not accepted, accepted


@pytest.mark.parametrize(
    "override, needle",
    [
        ("guard.spike_factor=.nan", "guard.spike_factor = nan is not allowed: must be a finite number"),
        ("health.start_loss_max=.nan", "health.start_loss_max = nan"),
        ("loss.auto_threshold_mib=.inf", "loss.auto_threshold_mib = inf"),
        ("train.weight_decay=.nan", "train.weight_decay = nan"),
        ("distill.temperature=.nan", "the KD temperature must be a finite number > 0"),  # the key's own message stays
        ("run.seed=-1", "run.seed = -1 is not allowed: a seed must be a whole number in [0, 2**32 - 1]"),
        ("run.seed=4294967296", "run.seed = 4294967296"),
        ("data.split_seed=100000000000000000000000", "data.split_seed"),
        ("data.num_proc=0", "data.num_proc = 0 is not allowed: must be a whole number >= 1"),
        ("data.num_proc=-1", "data.num_proc = -1"),
        ("distill.temperature=1e200", "must be at most 1000"),
        ("train.weight_decay=-1", "train.weight_decay = -1.0 is not allowed: must be >= 0"),
        ("guard.spike_mad=-1", "guard.spike_mad"),
        ("guard.spike_warmup=-5", "guard.spike_warmup = -5"),
        ("guard.max_rollbacks=0", "guard.max_rollbacks = 0 is not allowed: must be a whole number >= 1"),
        ("health.ppl_max=-1", "health.ppl_max = -1.0 is not allowed: must be a number > 0"),
        ("health.ppl_max=0", "health.ppl_max"),
        ("health.plateau_patience=0", "health.plateau_patience"),
        ("health.ppl_after_step=-1", "health.ppl_after_step = -1"),
        ("debug.exit_after_step=0", "debug.exit_after_step = 0"),
        ("debug.exit_after_step=-1", "debug.exit_after_step"),
        ("debug.exit_rank=-1", "debug.exit_rank = -1 is not allowed: must be a process rank >= 0"),
        ("loss.auto_threshold_mib=0", "loss.auto_threshold_mib = 0.0 is not allowed: must be a number > 0"),
        ("run.name=/tmp/elsewhere", "set run.output_dir"),
        ("run.name=a/b", "give a plain name"),
        ("run.name=a\\b", "give a plain name"),
        ("run.name=..", "give a plain name"),
        ("run.name=.", "give a plain name"),
    ],
    ids=lambda v: v if "=" in str(v) else "",
)
def test_out_of_range_values_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        Config.load(overrides=[override])
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "run.seed=0",
        "run.seed=4294967295",
        "data.num_proc=2",
        "data.num_proc=null",
        "distill.temperature=1000",
        "train.weight_decay=0",
        "guard.spike_mad=0",
        "guard.spike_warmup=0",
        "health.ppl_after_step=0",
        "debug.exit_after_step=1",
        "debug.exit_rank=0",
        "guard.max_rollbacks=1",
        "run.name=my-run_2",
    ],
)
def test_the_boundaries_are_allowed(override):
    Config.load(overrides=[override])


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match=r"run.mixed_precision = fp16 needs a CUDA GPU .*on the CPU use bf16 or no"):
        Config.load(overrides=["run.device=cpu", "run.mixed_precision=fp16"])
    Config.load(overrides=["run.device=cpu", "run.mixed_precision=bf16"])


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("train:\n  max_steps: 3\n  max_steps: 5\n", "max_steps", 3),
        ("train:\n  max_steps: 3\nrun:\n  seed: 1\ntrain:\n  lr: 0.1\n", "train", 5),
    ],
    ids=["key", "section"],
)
def test_duplicate_keys_in_a_config_file_are_refused(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file '.*dup.yaml': duplicate key '{key}' at line {line}; keep one"):
        load_yaml(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b\n  max_steps: 3\n  lr: 0.1\ntrain:\n  <<: *b\n  max_steps: 4\n")
    assert load_yaml(path)["train"] == {"max_steps": 4, "lr": 0.1}


def test_a_config_path_that_is_not_a_regular_file():
    with pytest.raises(ConfigError, match="'/dev/null' is not a regular file"):
        Config.load("/dev/null")


def test_overrides_must_be_a_list():
    with pytest.raises(ConfigError, match=r"overrides must be a list of 'key=value' strings.*got str"):
        Config.load(None, "train.max_steps=3")
    assert Config.load(None, ("train.max_steps=3",)).train.max_steps == 3


@pytest.mark.parametrize(
    "sources, match",
    [
        ([], r"data.sources.*non-empty list"),
        ([{"weight": 1}], r"data.sources\[0\].*must be a mapping with a path"),
        ([{"path": "a.txt", "weight": 0}], r"data.sources\[0\].weight.*finite number > 0"),
        ([{"path": "a.txt", "weight": -2}], r"data.sources\[0\].weight"),
        ([{"path": "a.txt", "weight": float("nan")}], r"data.sources\[0\].weight"),
        ([{"path": "a.txt", "weight": "heavy"}], r"data.sources\[0\].weight"),
        ([{"path": "a.txt", "weigth": 1}], r"unknown key\(s\) weigth"),
        ([{"path": "a.txt"}, {"path": "a.txt"}], r"two sources have this name"),
        ([{"path": ""}], r"data.sources\[0\].path"),
    ],
)
def test_bad_mixtures_are_one_line_errors(sources, match):
    cfg = Config()
    cfg.data.sources = sources
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_a_mixture_and_a_path_contradict_each_other():
    cfg = Config()
    cfg.set("data.path", "a.txt")
    cfg.set("data.sources", [{"path": "b.txt", "weight": 1}])
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        cfg.validate()


def test_a_valid_mixture_passes_and_loss_on_is_checked():
    cfg = Config()
    cfg.set("data.sources", [{"path": None, "weight": 2}, {"path": "chat.jsonl", "weight": 1, "name": "chat"}])
    cfg.validate()
    with pytest.raises(ConfigError, match="data.loss_on"):
        cfg.set("data.loss_on", "prompts")


def test_numbers_in_exponent_notation_are_numbers_wherever_config_values_are_read(tmp_path):
    """YAML 1.1 reads 1e-9 (no dot) as a string; every config value reads it as a number, as --lr 1e-4 does."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  sources:\n    - {path: a.txt, weight: 1e-9}\n    - {path: b.txt, weight: 2E+1}\n"
        "model:\n  student_config: {rope_theta: 1e6}\n"
    )
    cfg = Config.load(path)
    assert [s["weight"] for s in cfg.data.sources] == [1e-9, 20.0]
    assert cfg.model.student_config == {"rope_theta": 1e6}
    cfg = Config.load(None, ["data.sources=[{path: a.txt, weight: 1e-9}]", "train.lr=1e-4"])
    assert cfg.data.sources[0]["weight"] == 1e-9 and cfg.train.lr == 1e-4
    cfg = Config()
    cfg.set("data.sources", [{"path": "a.txt", "weight": "1e-9"}])  # a string through the Python API
    assert cfg.validate().data.sources[0]["weight"] == 1e-9
    assert Config.load(None, ["run.name=1e5"]).run.name == "100000.0"  # a string key keeps taking numbers


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}"


def test_alias_bombs_and_deep_nesting_are_refused_naming_the_file_or_flag(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  student_config: " + _alias_bomb() + "\n")
    with pytest.raises(ConfigError, match=r"config file '.*bomb.yaml' expands to more than 100,000 values"):
        Config.load(bomb)
    with pytest.raises(ConfigError, match=r"--set model.student_config expands to more than 100,000 values"):
        Config.load(None, ["model.student_config=" + _alias_bomb()])
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  student_config: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"config file '.*deep.yaml' is nested more than 32 levels deep"):
        Config.load(deep)
    with pytest.raises(ConfigError, match=r"--set model.student_config is nested more than 32 levels deep"):
        Config.load(None, ["model.student_config=" + "{a: " * 5000 + "1" + "}" * 5000])
    # a few aliases, as a config might use, still load
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        "model:\n  student_config: &shape {num_hidden_layers: 2}\n"
        "debug:\n  loss_multiplier: {}\n  inject: [{step: 1, where: loss, value: nan}]\n"
    )
    assert Config.load(fine).model.student_config == {"num_hidden_layers": 2}


def test_a_recursive_alias_and_a_nested_tracker_list_are_one_line_each():
    """A value containing itself and a list inside run.trackers ended in tracebacks."""
    with pytest.raises(ConfigError, match=r"--set model.student_config holds the alias \*c .*recursive alias"):
        Config.load(None, ["model.student_config=&c {num_hidden_layers: 1, rope_scaling: *c}"])
    with pytest.raises(ConfigError, match=r"recursive alias"):
        Config.load(None, ["model.student_config=&c [1, [*c]]"])
    assert Config.load(None, ["model.student_config={a: &x {b: 1}, c: *x}"]).model.student_config["c"] == {"b": 1}
    with pytest.raises(ConfigError, match=r"run.trackers entry \['wandb'\] is not a tracker name"):
        Config.load(None, ["run.trackers=[[wandb]]"]).validate()
