"""Tests of utils/config.py: loading, aliases, overrides, coercion, validation, helpers, and every shipped config."""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import pytest
import yaml

from utils.config import (
    ALIASES,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    default_device,
    describe_fields,
    field_docs,
    load_config,
    parse_prune_choice,
    parse_quant_choice,
    resolved_alphas,
    save_config,
    validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "official_configs", "*.yml")))
REFERENCE_NAMES = [
    "TokSparse_K10K100", "TokSparse_K20K100", "TokSparse_K40K100", "Prune_S30S100", "Prune_S40S100",
    "Prune_S50S100", "Quant_Q5Q10", "Quant_Q5Q16", "Quant_Q6Q16", "All_Variantsv2", "All_Variantsv3",
    "All_VariantsvMax", "AV_V_R4", "AV_V_R16", "AV_V_R64", "All_Variants_Llama3B", "All_Variants_Llama8Bi",
    "ContextualDistil8B",
]


def write(tmp_path, data, name="c.yml") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return str(path)


def test_round_trip_yaml(tmp_path):
    cfg = load_config(overrides=["keep_fracs=[0.1, 0.5, 1.0]", "struct_prune_choices=[s50, s100]",
                                 "quant_choices=[q4, q16]", "lr=3e-4", "reward_agg=sum", "max_blocks=12",
                                 "budget_tok_list=[0.2, 0.7]", "adv_whiten_global=false"])
    path = str(tmp_path / "sub" / "saved.yml")
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    save_config(again, path)
    assert load_config(path) == cfg
    assert [p for p in os.listdir(tmp_path / "sub")] == ["saved.yml"]  # no temp file left behind


def test_dict_round_trip_is_plain_json():
    cfg = load_config(os.path.join(ROOT, "official_configs", "All_VariantsvMax.yml"))
    d = config_to_dict(cfg)
    assert list(d) == [f.name for f in dataclasses.fields(Config)]
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_config_from_dict_validates():
    with pytest.raises(ConfigError, match="quest_page_size"):
        config_from_dict({**config_to_dict(Config()), "quest_page_size": 0})


@pytest.mark.parametrize("key,suggestion", [("lerning_rate", "lr"), ("keep_frac", "keep_fracs"),
                                            ("quest_page", "quest_page_size"), ("C_targt", "C_target")])
def test_unknown_key_names_closest(tmp_path, key, suggestion):
    path = write(tmp_path, {key: 1})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"unknown config key {key!r} in {path} (did you mean {suggestion!r}?)"


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"zzzzzz": 1})
    assert str(e.value) == "unknown config key 'zzzzzz' in --set overrides"


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_map_to_c_target(tmp_path, alias):
    assert load_config(write(tmp_path, {alias: 0.25})).C_target == 0.25
    assert load_config(write(tmp_path, {alias: 0.4, "C_target": 0.4})).C_target == 0.4
    assert load_config(overrides=[f"{alias}=0.3"]).C_target == 0.3


def test_alias_conflict_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="C_target.*keep_target"):
        load_config(write(tmp_path, {"C_target": 0.5, "keep_target": 0.3}))


def test_overrides_beat_file_and_parse_yaml(tmp_path):
    path = write(tmp_path, {"lr": "1e-3", "reward_agg": "sum", "keep_fracs": [0.5, 1.0]})
    cfg = load_config(path, ["lr=1e-4", "keep_fracs=[0.1,1.0]", "reward_agg=null", "dataset_config=v1_6-sample",
                             "max_blocks=7", "keep_target=0.2"])
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.keep_fracs == [0.1, 1.0]
    assert cfg.reward_agg is None
    assert cfg.dataset_config == "v1_6-sample"
    assert cfg.max_blocks == 7
    assert cfg.C_target == 0.2
    assert load_config(overrides={"lr": 0.5, "keep_fracs": (0.5, 1.0)}).keep_fracs == [0.5, 1.0]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["lr"])


def test_coercion(tmp_path):
    # JSON-styled YAML: PyYAML reads 1e-4 as the string "1e-4".
    path = write(tmp_path, '{"lr": 1e-4, "context_len": 64.0, "alpha_tok": 100, "keep_fracs": [1, 0.5]}')
    assert yaml.safe_load(open(path))["lr"] == "1e-4"
    cfg = load_config(path)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.context_len == 64 and isinstance(cfg.context_len, int)
    assert cfg.alpha_tok == 100.0 and isinstance(cfg.alpha_tok, float)
    assert cfg.keep_fracs == [1.0, 0.5] and all(isinstance(k, float) for k in cfg.keep_fracs)


def test_json_fallback(tmp_path):
    path = write(tmp_path, '{"lr":\t0.001, "batch_size": 4}')  # a tab is valid JSON but not YAML
    cfg = load_config(path)
    assert (cfg.lr, cfg.batch_size) == (0.001, 4)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_missing_file():
    with pytest.raises(ConfigError) as e:
        load_config("/nonexistent/dir/cfg.yml")
    assert str(e.value) == "config file not found: /nonexistent/dir/cfg.yml"


BAD_VALUES = [
    ("C_target", 1.5), ("budget_tok_min", -0.1), ("budget_prune_list", [0.5, 1.2]), ("budget_q_ratio_list", []),
    ("eval_C_pru", 2.0), ("C_target_quant_bits", 1), ("eval_C_qbits", 17), ("quant_choices", ["q1", "q16"]),
    ("quant_choices", ["q17"]), ("quant_choices", ["q8", "q8"]), ("struct_prune_choices", ["s0"]),
    ("struct_prune_choices", ["s101"]), ("struct_prune_choices", ["60"]), ("struct_prune_choices", ["s60", "s060"]),
    ("keep_fracs", []), ("keep_fracs", [0.0, 1.0]), ("keep_fracs", [0.5, 0.5]), ("keep_fracs", [1.5]),
    ("quest_page_size", 0), ("sparsity_criteria", "random"), ("relevancy_tier", "per_model"), ("Ts", -1),
    ("Tw", -2), ("dtype", "int8"), ("device", "gpu"), ("context_len", 0), ("rollout_len", 0), ("batch_size", 0),
    ("grpo_rollouts_per_input", 1), ("dataset_pct", 0), ("dataset_pct", 101), ("train_fraction", 0),
    ("dev_fraction", 1.0), ("reward_agg", "mean"), ("reward_gamma", 1.1), ("grpo_level", "token"),
    ("grpo_norm", "rank"), ("algo", "ppo"), ("ppo_clip", 0), ("ppo_epochs", 0), ("ppo_minibatch_size", 0),
    ("ppo_target_batch_size", 0), ("grad_accum_steps", 0), ("lr", 0), ("lr", "fast"), ("max_grad_norm", -1),
    ("pi_temperature", 0), ("entropy_coef", -0.01), ("task_w_kl", 1.5), ("policy_scalar_dim", 11),
    ("policy_max_len", 8), ("epochs", 0), ("budget_tolerance", -0.01), ("context_len", 2.5),
    ("adv_whiten_global", "yes"), ("keep_fracs", 0.5), ("model_name", ["a"]), ("seed", True),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_values_are_rejected_naming_the_field(name, value):
    overrides = {name: value, "rollout_len": 16} if name == "policy_max_len" else {name: value}
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert str(e.value).startswith(f"{name}:")
    assert "\n" not in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="^budget_tok_min: budget_tok_min=0.8 exceeds budget_tok_max=0.5"):
        load_config(overrides={"budget_tok_min": 0.8, "budget_tok_max": 0.5})
    with pytest.raises(ConfigError, match="^budget_prune_min: .*set together"):
        load_config(overrides={"budget_prune_min": 0.4})
    with pytest.raises(ConfigError, match="^policy_d_model: 100 is not divisible by policy_n_heads=8"):
        load_config(overrides={"policy_d_model": 100})
    with pytest.raises(ConfigError, match="^algo: sft is deprecated in the reference, not supported"):
        load_config(overrides={"algo": "sft"})
    with pytest.raises(ConfigError, match="^grpo_rollouts_per_input: GRPO needs >= 2"):
        load_config(overrides={"grpo_rollouts_per_input": 1})


def test_validate_catches_hand_built_configs():
    validate(Config())
    with pytest.raises(ConfigError, match="^lr:"):
        validate(dataclasses.replace(Config(), lr="0.1"))
    with pytest.raises(ConfigError, match="^sparsity_criteria:"):
        validate(dataclasses.replace(Config(), sparsity_criteria="Quest"))


def test_inert_fields_accept_non_default_values():
    cfg = load_config(overrides={"probe_metric": "lookahead_ce", "future_mask_rule": "dense", "eps_rel": 0.002})
    assert (cfg.probe_metric, cfg.future_mask_rule, cfg.eps_rel) == ("lookahead_ce", "dense", 0.002)


def test_shipped_configs_all_load():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES}
    assert set(REFERENCE_NAMES) <= names
    assert {"cpu_smollm2_joint", "cpu_smollm2_prune", "cpu_smollm2_tok", "cpu_smollm2_quant", "tiny"} <= names
    for path in CONFIG_FILES:
        cfg = load_config(path)
        assert isinstance(cfg.lr, float), path


def test_reference_config_values():
    cfg = load_config(os.path.join(ROOT, "official_configs", "All_VariantsvMax.yml"))
    grid = len(cfg.keep_fracs) * len(cfg.struct_prune_choices) * len(cfg.quant_choices)
    assert grid == 1560 and cfg.lr == 1e-4 and cfg.train_fraction == 0.36
    assert (cfg.quest_page_size, cfg.grpo_rollouts_per_input, cfg.C_target) == (8, 32, 0.5)
    distil = load_config(os.path.join(ROOT, "official_configs", "ContextualDistil8B.yml"))
    assert distil.keep_fracs[:2] == [0.05, 0.1] and len(distil.keep_fracs) == 11
    assert (distil.Ts, distil.Tw, distil.rollout_len, distil.policy_max_len) == (16, 16, 64, 512)
    r4 = load_config(os.path.join(ROOT, "official_configs", "AV_V_R4.yml"))
    assert len(r4.keep_fracs) * len(r4.struct_prune_choices) * len(r4.quant_choices) == 336


def test_resolved_alphas():
    base = {"alpha_tok": 100.0, "alpha_prune": 50.0, "alpha_quant": 200.0, "keep_fracs": [0.1, 1.0],
            "struct_prune_choices": ["s40", "s100"], "quant_choices": ["q5", "q16"]}
    assert resolved_alphas(load_config(overrides=base)) == (100.0, 50.0, 200.0)
    assert resolved_alphas(load_config(overrides={**base, "keep_fracs": [1.0]})) == (0.0, 50.0, 200.0)
    assert resolved_alphas(load_config(overrides={**base, "struct_prune_choices": ["s100"]})) == (100.0, 0.0, 200.0)
    assert resolved_alphas(load_config(overrides={**base, "quant_choices": ["q8"]})) == (100.0, 50.0, 0.0)
    assert resolved_alphas(load_config(overrides={**base, "enable_prune_quant": False})) == (100.0, 0.0, 0.0)
    # Reference fallback: alpha_prune <- alpha_tok, alpha_quant <- alpha_prune.
    fallback = {**base, "alpha_prune": None, "alpha_quant": None}
    assert resolved_alphas(load_config(overrides=fallback)) == (100.0, 100.0, 100.0)
    assert resolved_alphas(load_config(overrides={**fallback, "alpha_prune": 7})) == (100.0, 7.0, 7.0)


def test_choice_parsers():
    assert parse_prune_choice("s60") == 0.6 and parse_prune_choice("s100") == 1.0
    assert parse_quant_choice("q5") == 5 and parse_quant_choice("q16") == 16
    for bad in ("s0", "s101", "60", "s6.5", "S60"):
        with pytest.raises(ConfigError, match="struct_prune_choices"):
            parse_prune_choice(bad)
    for bad in ("q1", "q17", "5", "q"):
        with pytest.raises(ConfigError, match="quant_choices"):
            parse_quant_choice(bad)


def test_default_device(monkeypatch):
    import torch

    monkeypatch.setenv("LOCAL_RANK", "3")
    expected = "cuda:3" if torch.cuda.is_available() else "cpu"
    assert default_device(Config()) == expected
    assert default_device(load_config(overrides={"device": "cpu"})) == "cpu"


def test_docs_cover_every_field():
    docs = field_docs()
    assert list(docs) == [f.name for f in dataclasses.fields(Config)]
    assert all(doc.strip() for doc in docs.values())
    table = describe_fields().splitlines()
    assert len(table) == len(docs)
    assert table[0].split()[:2] == ["model_name", "smollm2-135m"]
    assert any(line.startswith("value_coef") and line.endswith("[inert]") for line in table)
