"""params.yaml loading: the shipped file is valid, and bad values fail at load naming the key."""

from pathlib import Path

import pytest
import yaml

from minigpt.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_match_dataclass_defaults():
    # params.yaml is the quick start; the dataclass defaults are documented to be the same values.
    assert load_params(ROOT / "params.yaml") == Params()


def _with(section: str, key: str, value):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = data
    *parents, leaf = f"{section}.{key}".split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


@pytest.mark.parametrize("section,key,value,needle", [
    ("tokenizer", "vocab_size", 200, "tokenizer.vocab_size"),
    ("tokenizer", "vocab_size", "big", "tokenizer.vocab_size: expected int"),
    ("process.pretrain", "validation_fraction", -0.1, "process.pretrain.validation_fraction"),
    ("process.sft", "test_fraction", 0.96, "must sum to less than 1"),
    ("process", "num_proc", -1, "process.num_proc: must be >= 0"),
    ("encode", "num_proc", -2, "encode.num_proc: must be >= 0"),
    ("model", "block_size", 4, "model.block_size"),
    ("model", "n_head", 5, "model.n_embd: must be divisible by n_head=5"),
    ("model", "dropout", 1.5, "model.dropout"),
    ("pretrain", "lr", 0, "pretrain.lr"),
    ("pretrain", "dtype", "fp8", "pretrain.dtype"),
    ("pretrain", "compile", "yes", "pretrain.compile: expected bool"),
    ("finetune", "patience", -1, "finetune.patience"),
    ("eval", "prompts", ["ok", ""], "eval.prompts"),
    ("process.sft", "columns", {"instruction": "q", "answer": "a"}, "process.sft.columns"),
    ("process.pretrain", "format", "jsonl", "process.pretrain.format: must be one of auto, "),
    ("tokenizer", "max_chars", -1, "tokenizer.max_chars: must be >= 0"),
    ("tokenizer", "max_doc_chars", -5, "tokenizer.max_doc_chars: must be >= 0"),
    ("pretrain", "lr", float("inf"), "pretrain.lr: must be a finite number (got inf)"),
    ("finetune", "beta2", float("nan"), "finetune.beta2: must be a finite number (got nan)"),
    ("pretrain", "grad_clip", 10**400, "pretrain.grad_clip: must be a finite number"),
    ("eval", "stride", 512, "eval.stride: must be <= model.block_size (256)"),
])
def test_bad_values_name_the_key(section, key, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_params(_with(section, key, value))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_the_old_wikitext_switch_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"process\.pretrain\.wikitext: unknown key \(replaced "
                                          r"by format: auto \| wikitext \| documents"):
        parse_params(_with("process.pretrain", "wikitext", True))


def test_the_removed_eval_seed_says_why():
    with pytest.raises(ConfigError, match=r"eval\.seed: unknown key \(removed: evaluation decodes "
                                          r"greedily"):
        parse_params(_with("eval", "seed", 1337))


def test_unknown_key_is_rejected_with_its_dotted_name():
    data = _with("model", "n_layers", 6)  # typo of n_layer
    with pytest.raises(ConfigError, match=r"model\.n_layers: unknown key"):
        parse_params(data)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2:1: not valid YAML"):  # file:line:column
        load_params(bad)
    bad.write_text("model:\n  block_size: 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: model.block_size: must be >= 8 \(got 2\)"):
        load_params(bad)


def test_partial_file_uses_defaults_and_ints_are_floats():
    p = parse_params({"pretrain": {"lr": 1}, "model": {"n_layer": 2}})
    assert p.pretrain.lr == 1.0 and isinstance(p.pretrain.lr, float)
    assert p.model.n_layer == 2 and p.model.n_embd == Params().model.n_embd
    

@pytest.mark.parametrize("section,key,value,needle", [
    ("pretrain", "optimizer", "sgd", "pretrain.optimizer: must be adamw or muon"),
    ("pretrain", "schedule", "linear", "pretrain.schedule: must be cosine or wsd"),
    ("pretrain", "decay_fraction", 0.0, "pretrain.decay_fraction"),
    ("pretrain", "muon_lr", -1, "pretrain.muon_lr"),
    ("pretrain", "muon_momentum", 1.0, "pretrain.muon_momentum"),
    ("model", "mlp", "gelu", "model.mlp: must be swiglu or relu2"),
    ("model", "qk_norm", "yes", "model.qk_norm: expected bool"),
    ("model", "logit_softcap", -1.0, "model.logit_softcap"),
])
def test_recipe_knobs_are_validated(section, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_params(_with(section, key, value))


def test_yaml_1_2_floats_written_as_strings_by_pyyaml_are_numbers(tmp_path):
    """`3e-3` is a string to PyYAML (YAML 1.1) but a float to DVC's -S and any YAML 1.2 reader."""
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  lr: 3e-3\n  muon_lr: 2E-2\nfinetune:\n  lr: -1e-4\n")
    assert yaml.safe_load(path.read_text())["pretrain"]["lr"] == "3e-3"  # the YAML 1.1 reading
    with pytest.raises(ConfigError, match=r"finetune.lr: must be > 0 \(got -0.0001\)"):
        load_params(path)
    path.write_text("pretrain:\n  lr: 3e-3\n  muon_lr: 2E-2\n")
    p = load_params(path)
    assert (p.pretrain.lr, p.pretrain.muon_lr) == (0.003, 0.02)
    for text in ("inf", "fast", "1_000", "0x10"):  # not YAML 1.2 floats: still refused
        path.write_text(f"pretrain:\n  lr: '{text}'\n")
        with pytest.raises(ConfigError, match="pretrain.lr: expected float"):
            load_params(path)


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_warmup_longer_than_training_names_both_keys(section):
    data = _with(section, "max_steps", 10)
    data[section]["warmup_steps"] = 11
    with pytest.raises(ConfigError, match=rf"{section}.warmup_steps: must be <= {section}.max_steps "
                       r"\(10\) \(got 11\)"):
        parse_params(data)
    data[section]["warmup_steps"] = 10
    parse_params(data)
