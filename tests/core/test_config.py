"""philora.core.config: YAML into frozen dataclasses, one-line errors naming the key, checked overrides."""

import dataclasses

import pytest
import yaml

from philora.core.config import (CONFIG_DIR, Config, ConfigError, ModelConfig, PeftConfig, TrainingConfig,
                            config_to_dict, load_config, save_config)


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_loads_yaml_into_frozen_dataclasses(tmp_path):
    p = write(tmp_path, """
model: {name_or_path: some/model, dtype: bfloat16}
training_config: {learning_rate: 1, max_steps: 7, output_dir: out}
peft_config: {r: 4, target_modules: [qkv_proj, o_proj], fused_slices: {gate_up_proj: [up]}}
""")
    cfg = load_config(p)
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)
    assert cfg.model.name_or_path == "some/model" and cfg.model.dtype == "bfloat16"
    # an int where a float is declared becomes a float
    assert cfg.training_config.learning_rate == 1.0 and isinstance(cfg.training_config.learning_rate, float)
    assert cfg.training_config.max_steps == 7
    assert cfg.peft_config.target_modules == ["qkv_proj", "o_proj"]
    assert cfg.peft_config.fused_slices == {"gate_up_proj": ["up"]}
    # untouched keys keep their defaults
    assert cfg.data == Config().data
    assert cfg.training_config.seed == TrainingConfig().seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training_config.max_steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelConfig()


def test_exponent_floats_in_yaml(tmp_path, helpers):
    """PyYAML reads `1e-4` (no dot) as a string; float keys accept it as the number it is."""
    p = write(tmp_path, "training_config:\n  learning_rate: 1e-4\n  adam_epsilon: 1E-8\n  weight_decay: 2e-2\n"
                        "model:\n  revision: 1e5\n")
    tc = load_config(p).training_config
    assert (tc.learning_rate, tc.adam_epsilon, tc.weight_decay) == (1e-4, 1e-8, 2e-2)
    assert load_config(p).model.revision == "1e5"  # a string key keeps the string
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "training_config: {learning_rate: 1e-4x}", "b.yaml"))
    helpers.one_line_error(e, "'training_config.learning_rate'")


def test_empty_file_and_empty_sections_are_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\npeft_config:\n", "b.yaml")) == Config()


@pytest.mark.parametrize("text, needle", [
    ("modle: {}", "'modle'"),
    ("training_config: {lerning_rate: 0.1}", "'training_config.lerning_rate'"),
    ("peft_config: {rank: 8}", "'peft_config.rank'"),
])
def test_unknown_key_names_it(tmp_path, text, needle, helpers):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    helpers.one_line_error(e, str(p), needle, "unknown key")


@pytest.mark.parametrize("text, needle", [
    ("training_config: {max_steps: ten}", "'training_config.max_steps'"),
    ("training_config: {max_steps: 2.5}", "'training_config.max_steps'"),
    ("training_config: {learning_rate: fast}", "'training_config.learning_rate'"),
    ("training_config: {progress_bar: 1}", "'training_config.progress_bar'"),
    ("training_config: {seed: true}", "'training_config.seed'"),
    ("model: {name_or_path: [a, b]}", "'model.name_or_path'"),
    ("peft_config: {target_modules: 3}", "'peft_config.target_modules'"),
    ("peft_config: {target_modules: [q_proj, 3]}", "'peft_config.target_modules'"),
    ("peft_config: {fused_slices: {qkv_proj: q}}", "'peft_config.fused_slices'"),
    ("model: 3", "'model'"),
    ("- a\n- b\n", "mapping"),
])
def test_wrong_type_names_the_key(tmp_path, text, needle, helpers):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    helpers.one_line_error(e, str(p), needle)


@pytest.mark.parametrize("key, bad", [
    ("model.dtype", "fp32"), ("model.attn_implementation", "flash"), ("data.format", "chatml"),
    ("data.truncation", "cut"), ("training_config.lr_scheduler_type", "cosine_with_restarts"),
    ("peft_config.bias", "some"), ("model.quantization", "int3"),
])
def test_choices(tmp_path, key, bad, helpers):
    section, name = key.split(".")
    p = write(tmp_path, f"{section}: {{{name}: {bad}}}")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = helpers.one_line_error(e, f"'{key}'", bad)
    assert "one of" in msg


@pytest.mark.parametrize("override", [
    "training_config.per_device_train_batch_size=0", "training_config.gradient_accumulation_steps=0",
    "training_config.logging_steps=0", "training_config.learning_rate=-1e-4", "training_config.save_steps=-1",
    "peft_config.r=0", "peft_config.lora_dropout=1.0", "peft_config.lora_alpha=0", "data.max_length=1",
    "data.eval_fraction=1", "training_config.warmup_ratio=1.5",
])
def test_out_of_range_values_name_the_key(tmp_path, override, helpers):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    helpers.one_line_error(e, f"'{key}'", "must be")
    p = write(tmp_path, "{}:\n  {}: {}\n".format(*key.split("."), override.split("=")[1]))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    helpers.one_line_error(e, str(p), f"'{key}'")


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["training_config.max_grad_norm=0", "training_config.save_steps=0",
                             "training_config.eval_steps=0", "peft_config.lora_dropout=0", "data.eval_fraction=0",
                             "training_config.save_total_limit=0", "training_config.report_samples=0"])
    assert cfg.training_config.max_grad_norm == 0.0 and cfg.peft_config.lora_dropout == 0.0


def test_bad_yaml_and_missing_file(tmp_path, helpers):
    p = write(tmp_path, "model:\n  dtype: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    helpers.one_line_error(e, str(p), "invalid YAML")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    helpers.one_line_error(e, "nope.yaml")
    with pytest.raises(ConfigError) as e:  # a directory is not a config file
        load_config(tmp_path)
    helpers.one_line_error(e, str(tmp_path))


def test_overrides_are_type_checked(tmp_path, helpers):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training_config.max_steps=abc"])
    helpers.one_line_error(e, "'training_config.max_steps'", "abc")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training_config.lerning_rate=0.1"])
    helpers.one_line_error(e, "'training_config.lerning_rate'")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["max_steps=3"])
    helpers.one_line_error(e, "'max_steps'")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training_config.max_steps"])
    helpers.one_line_error(e, "training_config.max_steps", "key=value")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dtype=fp8"])
    helpers.one_line_error(e, "'model.dtype'")


def test_override_values_parse():
    cfg = load_config(None, [
        "training_config.learning_rate=1e-4",  # YAML 1.1 reads this as a string; we want a float
        "training_config.max_steps=12",
        "training_config.adam_epsilon=1E-6",
        "training_config.progress_bar=false",
        "peft_config.target_modules=[q_proj,v_proj]",
        "peft_config.fused_slices={qkv_proj: [q, v]}",
        "model.revision=null",
        "model.quantization=nf4",
        "training_config.output_dir=runs/a=b",  # only the first '=' splits
    ])
    tc = cfg.training_config
    assert tc.learning_rate == pytest.approx(1e-4) and isinstance(tc.learning_rate, float)
    assert tc.adam_epsilon == pytest.approx(1e-6)
    assert tc.max_steps == 12 and tc.progress_bar is False
    assert cfg.peft_config.target_modules == ["q_proj", "v_proj"]
    assert cfg.peft_config.fused_slices == {"qkv_proj": ["q", "v"]}
    assert cfg.model.revision is None and cfg.model.quantization == "nf4"
    assert tc.output_dir == "runs/a=b"


@pytest.mark.parametrize("key, text", [
    ("training_config.output_dir", "2024"),
    ("training_config.output_dir", "1e-4"),
    ("model.revision", "1234567"),
    ("model.name_or_path", "3.5"),
    ("data.train", "true"),
])
def test_override_of_a_string_key_keeps_the_text(key, text):
    section, name = key.split(".")
    cfg = load_config(None, [f"{key}={text}"])
    assert getattr(getattr(cfg, section), name) == text


def test_overrides_apply_to_the_builtin_default():
    default = load_config()
    assert default == load_config(CONFIG_DIR / "tiny.yaml")
    assert default.model.name_or_path == "tiny"
    cfg = load_config(None, ["training_config.max_steps=2", "peft_config.r=4"])
    assert cfg.training_config.max_steps == 2 and cfg.peft_config.r == 4
    # everything else is tiny.yaml's, not the dataclass defaults
    expected = dataclasses.replace(default, training_config=dataclasses.replace(default.training_config, max_steps=2),
                                   peft_config=dataclasses.replace(default.peft_config, r=4))
    assert cfg == expected
    assert cfg.training_config.learning_rate != TrainingConfig().learning_rate


def test_overrides_on_a_file_and_into_an_empty_section(tmp_path, helpers):
    p = write(tmp_path, "training_config:\n  max_steps: 5\npeft_config:\n")
    cfg = load_config(p, ["training_config.max_steps=6", "peft_config.r=2"])
    assert cfg.training_config.max_steps == 6 and cfg.peft_config.r == 2
    with pytest.raises(ConfigError) as e:  # a type error after overrides still names the file
        load_config(p, ["peft_config.r=two"])
    helpers.one_line_error(e, str(p), "'peft_config.r'")


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["peft_config.target_modules=[q_proj,o_proj]",
                             "peft_config.fused_slices={gate_up_proj: [up]}", "training_config.learning_rate=3e-5",
                             "model.revision=abc", "training_config.output_dir=1e-4", "peft_config.lora_alpha=7"])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["training_config"]["output_dir"] == "1e-4"
    # the dataclass defaults round-trip too
    save_config(Config(), tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / name)
    assert isinstance(cfg, Config)
    assert cfg.peft_config.r > 0 and cfg.training_config.learning_rate > 0


def test_shipped_configs_present():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"tiny.yaml", "phi3-mini-lora.yaml"} <= names
    cfg = load_config(CONFIG_DIR / "phi3-mini-lora.yaml")
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert cfg.peft_config.target_modules == "all-linear"
    assert cfg.training_config.learning_rate == pytest.approx(2e-4)


def test_peft_config_default_is_not_shared():
    a, b = PeftConfig(), PeftConfig()
    assert a.fused_slices == {} and a.fused_slices is not b.fused_slices
