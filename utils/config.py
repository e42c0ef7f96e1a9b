"""SOL configuration: every field with its default and description, YAML loading, overrides and validation.

The field set mirrors the reference implementation's `Config` (so its official YAML files load unchanged)
plus the fields this reimplementation adds (marked "ours"). Unlike the reference, unknown keys are an error
that names the closest valid key, and values are type- and range-checked with messages naming the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

from utils.cli import SOLError

AXIS_NAMES = ("tok", "prune", "quant")  # κ, ρ, bits: the suffixes of the per-axis fields (alpha_tok, ...)


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a description in its metadata (used by `--help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class Config:
    # ---- model --------------------------------------------------------------------------------------
    model_name: str = _f("smollm2-135m", "HF hub id, local HF dir, .gguf path, or alias smollm2-135m / tiny-random-llama")
    dtype: str = _f("float32", "LM dtype: float32, bfloat16 or float16")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    seed: int = _f(1234, "base random seed (rank r uses seed + r)")

    # ---- action space -------------------------------------------------------------------------------
    keep_fracs: list = _f([0.05, 0.3, 0.6, 0.85, 1.0], "token keep fractions kappa (attention axis)")
    struct_prune_choices: list = _f(["s100"], "MLP input-channel keep choices, sNN keeps NN% of channels")
    quant_choices: list = _f(["q16"], "MLP-output activation bit-widths, qB = B bits, q16 = identity")
    sparsity_criteria: str = _f("recency", "attention sparsity: recency, relevancy or quest")
    relevancy_tier: str = _f("per_head", "relevancy ranking: per_head, or per_layer (head-averaged logits)")
    quest_page_size: int = _f(16, "QUEST page size in tokens")
    quest_keep_sink_window: bool = _f(False, "ours: QUEST also always keeps the Ts sinks, Tw window and current token")
    quest_tier: str = _f("per_head", "QUEST page ranking: per_head (reference: each query head its own pages), or "
                         "per_kv_head (ours: the query heads of a KV group share the pages ranked by their mean "
                         "bound, so gathered execution reads only the kept fraction of the cache)")
    Ts: int = _f(4, "attention sink tokens always kept (recency, relevancy)")
    Tw: int = _f(1, "recent window tokens always kept (recency, relevancy)")
    enable_prune_quant: bool = _f(True, "false holds the prune and quant axes dense (reference: unused)")

    # ---- data ---------------------------------------------------------------------------------------
    dataset_name: str = _f("wikitext2_local", "wikitext2_local (shipped data/), a local file/dir, or a datasets hub name")
    dataset_config: Optional[str] = _f(None, "datasets config name (e.g. wikitext-2-raw-v1, v1_6-sample)")
    text_field: str = _f("text", "text column of JSONL/CSV/Parquet/hub datasets")
    train_split: str = _f("train", "split used for training")
    eval_split: str = _f("test", "split used by the evaluators")
    context_len: int = _f(512, "dense prefill length C")
    rollout_len: int = _f(16, "decode steps per episode T")
    max_blocks: Optional[int] = _f(None, "cap on the number of blocks per split")
    dataset_pct: float = _f(100.0, "percentage of the source text used (0, 100]")
    train_fraction: float = _f(1.0, "fraction of the training batches consumed per epoch (reference hard-codes 0.36)")
    dev_fraction: float = _f(0.1, "ours: tail fraction of the training blocks held out as the dev split")
    block_cache_dir: str = _f("block_cache", "directory of the tokenized block cache (.npy)")

    # ---- rollouts -----------------------------------------------------------------------------------
    batch_size: int = _f(32, "input sequences per rollout batch (per rank)")
    grpo_rollouts_per_input: int = _f(16, "K counterfactual schedules per input sequence")
    rollout_contrast: str = _f("all", "ours: how the K rollouts of an input are drawn in training: all (the "
                               "reference: each samples its whole action independently) or one_axis (at each step "
                               "each group draws one axis with more than one level; the rollouts share their levels "
                               "on the other axes through common random numbers and differ on that one, so every "
                               "group comparison teaches one axis without noise from the others; each rollout is "
                               "still an exact draw from the policy, utils.schedulers.sample_one_axis_contrast)")
    epochs: int = _f(1, "passes over the training blocks")
    rollout_rows_per_forward: int = _f(128, "ours: memory knob, decode rows per batched forward. Training decodes "
                                       "as many rollout batches (batch_size x K rows each) of one update cycle "
                                       "together as fit (0 or < batch_size x K: one batch at a time); the "
                                       "research tools (placement, damage probe, imitation) batch their "
                                       "episodes up to it. Does not change what is learned")

    # ---- budgets ------------------------------------------------------------------------------------
    C_target: float = _f(0.5, "default token keep target (aliases keep_target, C_target_token)")
    C_target_prune: float = _f(0.7, "default prune keep target")
    C_target_quant_bits: float = _f(8.0, "default bit-width target (ratio = bits/16)")
    budget_tok_list: Optional[list] = _f(None, "training token budgets drawn uniformly from this list")
    budget_tok_min: Optional[float] = _f(None, "training token budget range, lower end")
    budget_tok_max: Optional[float] = _f(None, "training token budget range, upper end")
    budget_prune_list: Optional[list] = _f(None, "training prune budgets list")
    budget_prune_min: Optional[float] = _f(None, "training prune budget range, lower end")
    budget_prune_max: Optional[float] = _f(None, "training prune budget range, upper end")
    budget_q_ratio_list: Optional[list] = _f(None, "training quant budgets (bits/16) list")
    budget_q_ratio_min: Optional[float] = _f(None, "training quant budget range (bits/16), lower end")
    budget_q_ratio_max: Optional[float] = _f(None, "training quant budget range (bits/16), upper end")
    eval_C_tok: Optional[float] = _f(None, "evaluation token target (default C_target)")
    eval_C_pru: Optional[float] = _f(None, "evaluation prune target (default C_target_prune)")
    eval_C_qbits: Optional[float] = _f(None, "evaluation bit target (default C_target_quant_bits)")

    # ---- reward and penalty -------------------------------------------------------------------------
    alpha_tok: float = _f(1.0, "penalty weight, token axis")
    alpha_prune: Optional[float] = _f(None, "penalty weight, prune axis (default alpha_tok)")
    alpha_quant: Optional[float] = _f(None, "penalty weight, quant axis (default alpha_prune)")
    budget_tolerance: float = _f(0.02, "ours: dead zone of the squared budget penalty (reference hard-codes 0.02)")
    budget_credit: str = _f("episode", "ours: how the budget penalty reaches each step's advantage: episode (the "
                            "reference: every step of a rollout pays its whole-episode penalty) or step (each step "
                            "pays its own usage at the marginal price of its group's penalty; lower variance) or "
                            "price (each step pays its own usage at a price set by the row's budget: the quantile "
                            "of the counterfactual usage slopes of recent rollouts that the budget affords, "
                            "utils.grpo.budget_prices; on an axis with more than two levels the price at which "
                            "each step's best level spends the budget, utils.grpo.level_prices; replaces the "
                            "squared penalty, the alphas only log it)")
    budget_price_window: int = _f(64, "ours: rollout batches of usage slopes pooled for the price of "
                                  "budget_credit: price")
    budget_feedback_gain: float = _f(0.0, "ours: integral budget feedback inside the policy (0 = off, the "
                                     "reference). Before each step the policy's raw logits get -g * S . u(a), S the "
                                     "row's cumulative usage surplus over its budget so far (per axis, in budget "
                                     "units), u(a) an action's nominal usage: an over-spent row is pushed to cheaper "
                                     "actions in proportion to how much it overspent, so the budget holds by "
                                     "construction whatever the text, and the network only ranks the steps")
    budget_feedback_in_training: bool = _f(True, "ours: false = rollouts and the loss run the policy without the "
                                           "budget feedback (gain 0), which is then added at inference only (dev "
                                           "checks, evaluators, generation), so the sampled rollouts keep their "
                                           "contrast; the checkpoint keeps budget_feedback_gain for inference")
    policy_bracket_levels: bool = _f(False, "ours: the policy may take, on each axis, only the two levels that bracket "
                                      "the requested budget on that axis (the fixed baseline's two levels; the one "
                                      "level when the request is on it): the others get a -1e4 logit. Quality is "
                                      "concave in each axis, so a three-level spread at matched usage loses to "
                                      "fixed's two neighbours (results/joint_from_prune); with it the policy only "
                                      "places which steps take the upper level. A request on a level (or beyond the "
                                      "grid) pins that level, on any axis. Evaluators override it with "
                                      "--policy_bracket_levels on|off; a knob table records the setting it was "
                                      "fitted with, and loading it the other way prints a note")
    policy_logit_bound: float = _f(0.0, "ours: bound the network's logits to [-c, c] with c*tanh(logits/c) before the "
                                   "budget feedback is added (0 = unbounded, the reference). With feedback gain g a "
                                   "greedy row takes no dense step while its usage surplus exceeds 2c / (g * level gap): the network "
                                   "decides where inside that band the cheap steps go but cannot outvote the budget")
    knob_calibration_blocks: int = _f(0, "ours: after training, fit a knob calibration table "
                                      "(utils.knob_calibration) on this many train blocks for the final weights and "
                                      "write it as knob_calibration.json in the run directory, where every evaluator "
                                      "finds it (0 = off): a logit offset per requested budget, found by bisection in "
                                      "the policy's own greedy episodes at knob_calibration_gain, so the policy "
                                      "realises what is asked and the weak feedback only corrects drift")
    knob_calibration_gain: float = _f(5.0, "ours: the budget feedback gain the knob calibration is fitted at and "
                                      "that evaluators then run with (docs/grpo_recipe.md)")
    task_w_kl: float = _f(0.0, "reward = (1-w) log p(y) - w KL(dense || sparse)")
    reward_agg: Optional[str] = _f(None, "null (immediate), sum (discounted return) or max")
    reward_gamma: float = _f(0.82, "discount of reward_agg (1.0 disables aggregation, as the reference)")
    grpo_level: str = _f("process", "process (per-step returns) or outcome (episode return)")
    grpo_norm: str = _f("center", "group normalisation over K: center or zscore")
    adv_whiten_global: bool = _f(True, "whiten advantages over the whole batch")

    # ---- optimisation -------------------------------------------------------------------------------
    algo: str = _f("grpo", "training algorithm (only grpo)")
    pi_temperature: float = _f(0.7, "policy temperature during training")
    entropy_coef: float = _f(0.01, "entropy bonus")
    ppo_clip: float = _f(0.2, "PPO ratio clip")
    ppo_epochs: int = _f(1, "passes over each pooled update cycle")
    ppo_minibatch_size: int = _f(512, "(step, rollout) entries per minibatch")
    ppo_target_batch_size: int = _f(2048, "(step, rollout) entries pooled before an update cycle")
    grad_accum_steps: int = _f(1, "minibatch backward passes per optimizer step")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    kl_pi_ref_coef: float = _f(0.0, "KL(pi || pi_ref) coefficient, pi_ref = policy at start")
    policy_ema_decay: float = _f(0.0, "ours: exponential moving average of the policy weights after every optimizer "
                                 "step (0 = off, the reference; e.g. 0.95 averages the last ~20 steps, with the "
                                 "decay warming up as min(decay, (1+n)/(10+n))). Training continues from the raw "
                                 "weights; dev checks, checkpoints' policy_state_dict, exports and evaluators use "
                                 "the average (utils/ema.py)")

    # ---- policy network -----------------------------------------------------------------------------
    policy_d_model: int = _f(768, "policy width")
    policy_n_heads: int = _f(8, "policy attention heads")
    policy_n_layers: int = _f(2, "policy transformer blocks")
    policy_mlp_ratio: int = _f(4, "policy FFN width multiplier")
    policy_action_dim: int = _f(32, "previous-action embedding size")
    policy_dropout: float = _f(0.0, "policy dropout")
    policy_max_len: int = _f(1024, "max policy steps (position table size)")
    policy_scalar_dim: int = _f(8, "how many of the 10 scalar features are used: 8 = the reference's [t_frac, eff, "
                                  "C_tok, C_pru, C_q, dev_keep, dev_prune, dev_q]; 10 adds the surprisal of the "
                                  "input token and the entropy it was drawn from (nats / 10, from the LM's "
                                  "previous logits)")
    policy_use_hidden: bool = _f(True, "ours: feed the LM's hidden state to the policy (false = zeros: the "
                                 "hidden-state-blind ablation)")
    policy_use_token: bool = _f(True, "ours: feed the next token's embedding to the policy (false = zeros; with "
                                "policy_use_hidden false the policy is content-blind)")
    policy_head_init_scale: float = _f(1.0, "ours: scale of the initial weights of the two layers that write the "
                                       "logits (pi and the budget head's last layer); 1 = PyTorch's default, the "
                                       "reference. 0.01 starts every seed from a near-uniform policy that has no "
                                       "content preference to unlearn (the last-layer scaling recommended by "
                                       "Andrychowicz et al. 2021, 'What matters in on-policy RL'); only a new run's "
                                       "initialisation, checkpoints load as saved")
    policy_head: str = _f("joint", "ours: joint (the reference: one logit per action of the grid) or factorised (one "
                          "logit per level of each axis, an action's logit the sum of its levels': a product of "
                          "one distribution per axis, so every rollout teaches each axis's levels whatever the "
                          "other axes took; 3 x 3 logits instead of 27 on the joint grid)")
    policy_middle_level_bias: float = _f(0.0, "ours: initial bias (logits, before the bound) of the factorised head's "
                                         "middle levels (those between an axis's cheapest and dearest). With a "
                                         "near-uniform start the knob offsets and the feedback are linear in usage, so "
                                         "the greedy policy only takes an axis's two end levels; a bias of 1 makes it "
                                         "dither between neighbouring levels, as the fixed schedule does")
    policy_init_from: Optional[str] = _f(None, "ours: start a new run's factorised policy from the exported policy "
                                         "(or run) directory given, trained on one axis of this grid (e.g. the prune "
                                         "policy for the joint grid): its trunk is copied and its axis's level logits "
                                         "carried over (utils.policy_transfer); the other axes start fresh. Not with "
                                         "--checkpoint_path; ignored on --resume")
    policy_train_axes: Optional[list] = _f(None, "ours: train only the factorised head's rows for these axes' level "
                                           "logits (a list of tok, prune, quant), the rest of the policy frozen, and "
                                           "with rollout_contrast: one_axis contrast only these axes. With "
                                           "policy_init_from, e.g. [tok, quant]: GRPO adds the other axes on the "
                                           "transferred trunk without wearing its placement down (the head rows get no "
                                           "weight decay, so the frozen ones stay exactly). null: all train")
    policy_tbptt_k: int = _f(0, "accepted for compatibility; no effect (reference: unused)")
    eval_sparsity_bias: float = _f(0.0, "eval logit bias against dense kappa")
    eval_prune_bias: float = _f(0.0, "eval logit bias against dense prune")
    eval_quant_bias: float = _f(0.0, "eval logit bias against high bits")

    # ---- run ----------------------------------------------------------------------------------------
    run_name: str = _f("sol", "run name (directory prefix, wandb name)")
    output_dir: str = _f("checkpoints", "parent directory of run directories")
    log_every: int = _f(1, "log metrics every N rollout batches")
    eval_every_updates: int = _f(0, "dev-split evaluation every N optimizer updates (0 = off)")
    dev_eval_blocks: int = _f(16, "ours: blocks used by the in-training dev evaluation")
    dev_placement_blocks: int = _f(4, "ours: dev blocks of the placement check at each dev evaluation (the policy's "
                                      "expected spend correlated with the damage of one cheap step; T + 1 episodes "
                                      "per block; 0 = off)")

    # ---- reference SFT-path fields: accepted so official configs load, they have no effect ---------
    value_coef: float = _f(0.3, "no effect (critic-free GRPO)", inert=True)
    gamma: float = _f(1.0, "no effect (see reward_gamma)", inert=True)
    gae_lambda: float = _f(0.9, "no effect", inert=True)
    horizon: int = _f(4, "no effect (deprecated SFT probe)", inert=True)
    probe_metric: str = _f("dense_kl", "no effect (deprecated SFT probe)", inert=True)
    future_mask_rule: str = _f("policy", "no effect (deprecated SFT probe)", inert=True)
    eps_rel: float = _f(0.02, "no effect (deprecated SFT probe)", inert=True)
    eps_acc: float = _f(0.002, "no effect (deprecated SFT probe)", inert=True)
    margin_soft_tau: float = _f(0.1, "no effect (deprecated SFT teacher)", inert=True)
    score_soft_tau: float = _f(0.1, "no effect (deprecated SFT teacher)", inert=True)
    tr_kl_coef: float = _f(0.0, "no effect (deprecated SFT teacher)", inert=True)
    grpo_quality_topq: float = _f(1.0, "no effect (reference: unused)", inert=True)


ALIASES = {"keep_target": "C_target", "C_target_token": "C_target"}

# Common spellings that are not keys, only used to suggest the right one in "unknown key" errors.
_HINTS = {
    "learning_rate": "lr", "temperature": "pi_temperature", "group_size": "grpo_rollouts_per_input",
    "num_rollouts": "grpo_rollouts_per_input", "gradient_accumulation_steps": "grad_accum_steps",
    "prefill_len": "context_len", "episode_len": "rollout_len", "page_size": "quest_page_size",
    "model": "model_name", "dataset": "dataset_name",
}
_FLOAT_LISTS = ("keep_fracs", "budget_tok_list", "budget_prune_list", "budget_q_ratio_list")
_STR_LISTS = ("struct_prune_choices", "quant_choices")
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


class ConfigError(SOLError, ValueError):
    """A bad config file, key or value; the one-line message names the field."""


# ---- action-choice parsing ---------------------------------------------------------------------------

def parse_prune_choice(choice: str) -> float:
    """`"s60"` -> 0.6: the fraction of MLP input channels kept."""
    m = re.fullmatch(r"s(\d+)", choice) if isinstance(choice, str) else None
    if m is None or not 1 <= int(m.group(1)) <= 100:
        raise ConfigError(f"struct_prune_choices: bad choice {choice!r}, expected sNN with NN in 1..100")
    return int(m.group(1)) / 100.0


def parse_quant_choice(choice: str) -> int:
    """`"q5"` -> 5: the bit-width of the MLP output activations (16 = identity)."""
    m = re.fullmatch(r"q(\d+)", choice) if isinstance(choice, str) else None
    if m is None or not 2 <= int(m.group(1)) <= 16:
        raise ConfigError(f"quant_choices: bad choice {choice!r}, expected qB with B in 2..16")
    return int(m.group(1))


# ---- coercion ----------------------------------------------------------------------------------------

def _to_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{name}: expected a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {v!r}") from None


def _coerce(name: str, v: Any) -> Any:
    """Coerce a raw YAML value to the field's declared type (YAML reads `1e-4` as a string)."""
    tp = _TYPES[name]
    args = typing.get_args(tp)
    if type(None) in args:
        if v is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{name}: expected true or false, got {v!r}")
        return v
    if tp is float:
        return _to_float(name, v)
    if tp is int:
        x = _to_float(name, v)
        if not x.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {v!r}")
        return int(x)
    if tp is str:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {v!r}")
        return str(v)
    if tp is list:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {v!r}")
        if name in _FLOAT_LISTS:
            return [_to_float(name, x) for x in v]
        if name in _STR_LISTS and not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{name}: expected a list of strings, got {v!r}")
        return list(v)
    raise TypeError(f"{name}: unsupported field type {tp!r}")


def _unknown(key: str, source: str) -> ConfigError:
    candidates = {**{n: n for n in _FIELDS}, **{a: a for a in ALIASES}, **_HINTS}
    close = difflib.get_close_matches(key, list(candidates), n=1)
    hint = f" (did you mean {candidates[close[0]]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _canonical(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to their field and reject unknown keys or conflicting alias values within one source."""
    out: dict[str, Any] = {}
    seen_from: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} in {source} is not a string")
        name = ALIASES.get(key, key)
        if name not in _FIELDS:
            raise _unknown(key, source)
        if name in out and out[name] != value:
            raise ConfigError(f"{name}: {seen_from[name]}={out[name]!r} conflicts with {key}={value!r} in {source}")
        out[name], seen_from[name] = value, key
    return out


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """`["lr=1e-4", "keep_fracs=[0.1,1.0]"]` -> {"lr": 1e-4, ...}; values parsed as YAML."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: cannot parse override value {text!r}: {e}") from None
    return out


def _read_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _build(*layers: Mapping[str, Any]) -> Config:
    """Apply canonical key/value layers over the defaults, coerce, validate."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


# ---- public loading API ------------------------------------------------------------------------------

def load_config(path: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Defaults, then the YAML/JSON file at `path`, then `--set key=value` overrides; coerced and validated."""
    file_values = _canonical(_read_file(path), path) if path is not None else {}
    return _build(file_values, _canonical(_parse_overrides(overrides), "--set overrides"))


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild a config from a plain dict (e.g. the one stored in a checkpoint), with full validation."""
    return _build(_canonical(d, "the stored config"))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON-able dict of every field, in declaration order."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write `cfg` as YAML atomically (temp file in the same directory, then os.replace)."""
    from utils.io import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=None))


def eval_targets(cfg: Config, tgt_keep: float | None = None, tgt_prune_keep: float | None = None,
                 tgt_quant_bits: float | None = None) -> tuple[float, float, float]:
    """The requested (κ, ρ, bits) of an evaluation: each `--tgt_*` flag given, else the config's `eval_C_*`,
    else its training default `C_target*`. The one resolver every evaluator uses."""
    def pick(flag: float | None, eval_value: float | None, default: float) -> float:
        return float(flag if flag is not None else eval_value if eval_value is not None else default)

    return (pick(tgt_keep, cfg.eval_C_tok, cfg.C_target), pick(tgt_prune_keep, cfg.eval_C_pru, cfg.C_target_prune),
            pick(tgt_quant_bits, cfg.eval_C_qbits, cfg.C_target_quant_bits))


def field_docs() -> dict[str, str]:
    """Field name -> one-line description."""
    return {n: f.metadata["doc"] for n, f in _FIELDS.items()}


def describe_fields() -> str:
    """A plain-text table (name, default, description) of every field, for `--help` epilogs and the README."""
    cfg = Config()
    rows = [(n, json.dumps(getattr(cfg, n)).strip('"'),
             f.metadata["doc"] + (" [inert]" if f.metadata.get("inert") else "")) for n, f in _FIELDS.items()]
    w1 = max(len(r[0]) for r in rows)
    w2 = min(max(len(r[1]) for r in rows), 30)
    return "\n".join(f"{n:<{w1}}  {d:<{w2}}  {doc}" for n, d, doc in rows)


# ---- validation --------------------------------------------------------------------------------------

_CHOICES = {
    "sparsity_criteria": ("recency", "relevancy", "quest"), "relevancy_tier": ("per_head", "per_layer"),
    "quest_tier": ("per_head", "per_kv_head"),
    "dtype": ("float32", "bfloat16", "float16"), "reward_agg": (None, "sum", "max"),
    "grpo_level": ("process", "outcome"), "budget_credit": ("episode", "step", "price"),
    "grpo_norm": ("center", "zscore"), "policy_head": ("joint", "factorised"),
    "rollout_contrast": ("all", "one_axis"),
}
# (fields, description, predicate); a null Optional value skips its rule.
_RANGES = [
    (("context_len", "rollout_len", "batch_size", "grpo_rollouts_per_input", "epochs", "ppo_epochs",
      "ppo_minibatch_size", "ppo_target_batch_size", "grad_accum_steps", "log_every", "dev_eval_blocks",
      "quest_page_size", "max_blocks", "budget_price_window", "policy_d_model", "policy_n_heads", "policy_n_layers",
      "policy_mlp_ratio", "policy_action_dim"), ">= 1", lambda v: v >= 1),
    (("Ts", "Tw", "alpha_tok", "alpha_prune", "alpha_quant", "budget_tolerance", "entropy_coef", "weight_decay",
      "kl_pi_ref_coef", "eval_every_updates", "rollout_rows_per_forward", "budget_feedback_gain", "policy_logit_bound",
      "dev_placement_blocks", "knob_calibration_blocks", "knob_calibration_gain", "policy_head_init_scale"), ">= 0", lambda v: v >= 0),
    (("ppo_clip", "lr", "max_grad_norm", "pi_temperature"), "> 0", lambda v: v > 0),
    (("C_target", "C_target_prune", "eval_C_tok", "eval_C_pru", "task_w_kl", "reward_gamma", "budget_tok_min",
      "budget_tok_max", "budget_prune_min", "budget_prune_max", "budget_q_ratio_min", "budget_q_ratio_max"),
     "in [0, 1]", lambda v: 0 <= v <= 1),
    (("C_target_quant_bits", "eval_C_qbits"), "in [2, 16] bits", lambda v: 2 <= v <= 16),
    (("dataset_pct",), "in (0, 100]", lambda v: 0 < v <= 100),
    (("train_fraction",), "in (0, 1]", lambda v: 0 < v <= 1),
    (("dev_fraction", "policy_dropout", "policy_ema_decay"), "in [0, 1)", lambda v: 0 <= v < 1),
    (("policy_scalar_dim",), "in 1..10", lambda v: 1 <= v <= 10),
]


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def _check_unique(name: str, values: Sequence[Any]) -> None:
    _check(len(values) > 0, name, "must not be empty")
    _check(len(set(values)) == len(values), name, f"duplicate choices in {values!r}")


def validate(cfg: Config) -> None:
    """Type- and range-check the config; raise ConfigError naming the first bad field."""
    for name, tp in _TYPES.items():  # guards configs built by hand rather than loaded
        v = getattr(cfg, name)
        if v is not None or type(None) not in typing.get_args(tp):
            _check(_coerce(name, v) == v, name, f"invalid value {v!r}")
    for f in dataclasses.fields(cfg):  # nan passes no comparison but inf passes "> 0": refuse both everywhere
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            _check(not isinstance(x, float) or math.isfinite(x), f.name, f"must be a finite number, got {x!r}")
    for name, allowed in _CHOICES.items():
        v = getattr(cfg, name)
        _check(v in allowed, name, f"must be one of {', '.join(a or 'null' for a in allowed)}, got {v!r}")
    for names, desc, ok in _RANGES:
        for name in names:
            v = getattr(cfg, name)
            _check(v is None or ok(v), name, f"must be {desc}, got {v!r}")
    _check_unique("keep_fracs", cfg.keep_fracs)
    for k in cfg.keep_fracs:
        _check(0.0 < k <= 1.0, "keep_fracs", f"each value must be in (0, 1], got {k!r}")
    _check_unique("struct_prune_choices", [parse_prune_choice(c) for c in cfg.struct_prune_choices])
    _check_unique("quant_choices", [parse_quant_choice(c) for c in cfg.quant_choices])
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None, "device",
           f"must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    for axis in ("tok", "prune", "q_ratio"):
        lst, lo, hi = (f"budget_{axis}_{s}" for s in ("list", "min", "max"))
        values = getattr(cfg, lst)
        _check(values is None or len(values) > 0, lst, "must not be empty (use null for none)")
        _check(all(0.0 <= v <= 1.0 for v in values or ()), lst, f"every value must be in [0, 1], got {values!r}")
        vlo, vhi = getattr(cfg, lo), getattr(cfg, hi)
        _check((vlo is None) == (vhi is None), lo, f"{lo} and {hi} must be set together")
        _check(vlo is None or vlo <= vhi, lo, f"{lo}={vlo} exceeds {hi}={vhi}")
    _check(cfg.algo != "sft", "algo", "sft is deprecated in the reference, not supported (use grpo)")
    _check(cfg.algo == "grpo", "algo", f"must be grpo, got {cfg.algo!r}")
    _check(cfg.grpo_rollouts_per_input >= 2, "grpo_rollouts_per_input",
           f"GRPO needs >= 2 rollouts per input for a non-zero centred advantage, got {cfg.grpo_rollouts_per_input}")
    _check(cfg.policy_d_model % cfg.policy_n_heads == 0, "policy_d_model",
           f"{cfg.policy_d_model} is not divisible by policy_n_heads={cfg.policy_n_heads}")
    _check(cfg.policy_max_len >= cfg.rollout_len, "policy_max_len",
           f"must be >= rollout_len={cfg.rollout_len}, got {cfg.policy_max_len}")
    for name in ("policy_middle_level_bias", "policy_init_from", "policy_train_axes"):
        _check(not getattr(cfg, name) or cfg.policy_head == "factorised", name,
               "needs policy_head: factorised (one logit per axis level)")
    axes = cfg.policy_train_axes
    _check(axes is None or (isinstance(axes, list) and axes and set(axes) <= set(AXIS_NAMES)
                            and len(set(axes)) == len(axes)), "policy_train_axes",
           f"expected null or a non-empty list of distinct {list(AXIS_NAMES)}, got {axes!r}")


# ---- derived values ----------------------------------------------------------------------------------

def resolved_alphas(cfg: Config) -> tuple[float, float, float]:
    """(alpha_tok, alpha_prune, alpha_quant) after the reference's fallbacks; an axis with one choice gets 0."""
    a_tok = cfg.alpha_tok
    a_pru = a_tok if cfg.alpha_prune is None else cfg.alpha_prune
    a_q = a_pru if cfg.alpha_quant is None else cfg.alpha_quant
    prune_free = cfg.enable_prune_quant and len(set(map(parse_prune_choice, cfg.struct_prune_choices))) > 1
    quant_free = cfg.enable_prune_quant and len(set(map(parse_quant_choice, cfg.quant_choices))) > 1
    return (float(a_tok) if len(set(cfg.keep_fracs)) > 1 else 0.0,
            float(a_pru) if prune_free else 0.0,
            float(a_q) if quant_free else 0.0)


def default_device(cfg: Config) -> str:
    """Resolve `device: auto` to cuda:LOCAL_RANK when CUDA is available, else cpu; other values pass through."""
    if cfg.device != "auto":
        return cfg.device
    import torch  # deferred: loading a config should not pay for importing torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
