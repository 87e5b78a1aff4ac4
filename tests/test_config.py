"""Layer 5 for pipeline/config.py: every shipped YAML loads, overrides are YAML-typed, errors name file and field."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "conf").glob("**/*.yaml"))


def test_the_glob_finds_the_shipped_configs():
    # recursive glob (torchtune's non-recursive check silently validated only some configs)
    assert len(CONFIGS) >= 2
    assert ROOT / "conf" / "tiny.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the file's own values are the ones loaded (not silently replaced by defaults)
    data = yaml.safe_load(path.read_text())
    assert cfg.name == data["name"]
    assert cfg.generate.num_samples == data["generate"]["num_samples"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_starts_with_the_command_that_uses_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and str(path.relative_to(ROOT)) in first


def test_tiny_preset_restates_the_embedded_default():
    assert load_config(ROOT / "conf" / "tiny.yaml") == RunConfig()
    assert load_config(None) == RunConfig()


def test_relative_path_from_the_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_config("conf/tiny.yaml") == RunConfig()


def test_paper_preset_values():
    cfg = load_config(ROOT / "conf" / "dice-llama3-8b.yaml")
    assert (cfg.generate.num_samples, cfg.pairs.min_valid, cfg.pairs.replay_ratio) == (16, 8, 0.5)
    assert cfg.train.beta == 0.1 and cfg.train.learning_rate == 5e-7
    assert cfg.train.global_batch_size == 32 and cfg.round0.mode == "skip"


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_are_yaml_typed():
    cfg = load_config(
        ROOT / "conf" / "tiny.yaml",
        [
            "generate.num_samples=8",  # int
            "model.reference=null",  # None
            "model.policy=some/hub-id",  # str
            "train.beta=0.25",  # float
            "pairs.debias_length=false",  # bool
            "generate.engine.kv_cache_memory_bytes=1024",  # three levels deep
        ],
    )
    assert cfg.generate.num_samples == 8 and type(cfg.generate.num_samples) is int
    assert cfg.model.reference is None
    assert cfg.model.policy == "some/hub-id"
    assert cfg.train.beta == 0.25
    assert cfg.pairs.debias_length is False
    assert cfg.generate.engine.kv_cache_memory_bytes == 1024


def test_override_replaces_a_value_from_the_file():
    cfg = load_config(ROOT / "conf" / "dice-llama3-8b.yaml", ["model.reference=null", "generate.num_samples=10"])
    assert cfg.model.reference is None
    assert cfg.generate.num_samples == 10
    assert cfg.model.policy == "princeton-nlp/Llama-3-Base-8B-SFT-DPO"  # untouched siblings stay


def test_empty_value_means_null():
    assert load_config(None, ["round0.max_pairs="]).round0.max_pairs is None


def test_overrides_on_the_embedded_default():
    assert load_config(None, ["generate.num_samples=8"]).generate.num_samples == 8


# ---------------------------------------------------------------------------------------------- errors


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_in_file(tmp_path):
    p = write(tmp_path, "generate:\n  num_sampels: 8\n")  # typo
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert "generate.num_sampels" in str(e.value)


def test_unknown_top_level_section(tmp_path):
    p = write(tmp_path, "generation:\n  num_samples: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "generation" in str(e.value)


def test_wrong_type_in_file(tmp_path):
    p = write(tmp_path, "train:\n  beta: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.beta" in str(e.value)


def test_out_of_range_value(tmp_path):
    p = write(tmp_path, "pairs:\n  replay_ratio: 1.0\n")  # γ must be < 1
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "pairs.replay_ratio" in str(e.value)


def test_unknown_key_in_override():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "conf" / "tiny.yaml", ["generate.num_sampels=8"])
    msg = str(e.value)
    assert "conf/tiny.yaml" in msg and "generate.num_sampels" in msg


def test_wrong_type_in_override():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "conf" / "tiny.yaml", ["generate.num_samples=abc"])
    msg = str(e.value)
    assert "conf/tiny.yaml" in msg and "generate.num_samples" in msg


@pytest.mark.parametrize(
    "override",
    [
        "generate",  # no '='
        "=8",  # no key
        "generate.num_samples=[1",  # value is not valid YAML
    ],
)
def test_bad_override_syntax_names_the_override(override):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "conf" / "tiny.yaml", [override])
    assert repr(override) in str(e.value)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model=3", "model.policy=x"])
    assert "model.policy=x" in str(e.value) and "'model' is not a section" in str(e.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "mapping" in str(e.value)


def test_invalid_yaml(tmp_path):
    p = write(tmp_path, "generate: {num_samples: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_empty_file_is_the_default(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == RunConfig()


def test_min_valid_above_num_samples(tmp_path):
    p = write(tmp_path, "generate:\n  num_samples: 4\npairs:\n  min_valid: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "pairs.min_valid" in msg and "generate.num_samples" in msg
    # the boundary is allowed
    assert load_config(p, ["pairs.min_valid=4"]).pairs.min_valid == 4


@pytest.mark.parametrize(
    "micro, procs, global_, ok",
    [
        (2, 1, 8, True),  # 8 = 4 steps of 2
        (2, 1, 7, False),  # 7 is not a multiple of 2
        (2, 4, 8, True),  # 8 = 2·4
        (2, 4, 12, False),  # 12 is not a multiple of 2·4 = 8 (though it is one of 2 and of 4)
        (3, 2, 18, True),  # 18 = 3·(3·2)
    ],
)
def test_global_batch_multiple_of_micro_times_processes(tmp_path, micro, procs, global_, ok):
    text = f"train:\n  micro_batch_size: {micro}\n  num_processes: {procs}\n  global_batch_size: {global_}\n"
    p = write(tmp_path, text)
    if ok:
        assert load_config(p).train.global_batch_size == global_
    else:
        with pytest.raises(ConfigError) as e:
            load_config(p)
        msg = str(e.value)
        assert str(p) in msg and "train.global_batch_size" in msg and "train.micro_batch_size" in msg


def test_python_labeller_needs_python_reward(tmp_path):
    p = write(tmp_path, "label:\n  labeller: python\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "label.python_reward" in msg
    cfg = load_config(p, ["label.python_reward=pipeline.method.rewards:prompt_coverage"])
    assert cfg.label.python_reward == "pipeline.method.rewards:prompt_coverage"


def test_closed_choices_are_checked(tmp_path):
    p = write(tmp_path, "pairs:\n  length_unit: words\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "pairs.length_unit" in str(e.value)


def test_several_errors_are_all_reported(tmp_path):
    p = write(tmp_path, "train:\n  beta: -1\ngenerate:\n  top_p: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.beta" in str(e.value) and "generate.top_p" in str(e.value)


def test_config_error_is_a_value_error():
    # stages/common.py reports ValueError subclasses as a clean "error:" line, not a traceback
    assert issubclass(ConfigError, ValueError)
