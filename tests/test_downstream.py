"""Tests of the lm-eval adapter (utils/lm_eval_adapter.py), the shipped task configs and eval_downstream.py."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.config import config_to_dict, load_config  # noqa: E402
from utils.lm import ControlledLM  # noqa: E402
from utils.lm_eval_adapter import (LOCAL_TASKS_DIR, SOLHarnessLM, TaskNameError, _names_cache_path,  # noqa: E402
                                   accuracy_summary, make_task_manager, plan_batches, task_accuracy)
from utils.model import load_lm  # noqa: E402
from utils.runtime import make_scheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_lm_with_ref):
    return tiny_lm_with_ref


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny):
    cfg, _, _, policy = tiny
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint({"policy_state_dict": policy.state_dict(), "cfg": config_to_dict(cfg)}, d / "policy_latest.pt")
    return d


def req(*args):
    return SimpleNamespace(args=args)


def plain_sum_logp(ref, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = ref(ids).logits[0, len(ctx) - 1: -1].float()
    return float(F.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())


# ---- tokenisation and scoring ---------------------------------------------------------------------------
def test_encode_pair_joint_tokenisation(tiny):
    _, lm, _, _ = tiny
    h = SOLHarnessLM(lm, None, (1, 1, 1), 8, progress=False)
    tok = lm.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    for ctx, cont in [("A man is sitting on a roof. He", " is using wrap."), ("Question: 2+2=", "4"),
                      ("The end ", "of the story"), ("x", " y")]:
        c, k = h.encode_pair(ctx, cont)
        assert c + k == enc(ctx + cont)  # the model's own tokenisation of the full text
        assert len(c) >= 1 and len(k) >= 1
    # "hello" + "world" merge across the boundary: the context keeps its ids, the continuation is scored
    # over exactly its own characters
    assert enc("helloworld")[: len(enc("hello"))] != enc("hello")
    assert h.encode_pair("hello", "world") == (enc("hello"), enc("world"))
    # trailing context whitespace moves into the continuation
    c, k = h.encode_pair("The end ", "of the story")
    assert tok.decode(k).startswith(" ")
    # empty context: the prefix token (BOS if the tokenizer has one, else EOS), as lm-eval's HF model
    c, k = h.encode_pair("", "Hello world")
    assert c == [h.prefix_token_id] and k == tok("Hello world", add_special_tokens=False).input_ids


def test_dense_loglikelihood_equals_plain_model(tiny):
    _, lm, ref, _ = tiny
    h = SOLHarnessLM(lm, make_scheduler("dense", lm), (1, 1, 1), 4, progress=False)
    pairs = [("The quick brown fox jumps over the lazy dog and then", " it runs far away into the deep forest at night"),
             ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
             ("", " hello there")]
    res = h.loglikelihood([req(*p) for p in pairs])
    for (ctx, cont), (logp, greedy) in zip(pairs, res):
        c, k = h.encode_pair(ctx, cont)
        assert math.isclose(logp, plain_sum_logp(ref, c, k), abs_tol=ATOL)
        assert isinstance(greedy, bool)
    assert h.tracker.n_requests == 3 and h.tracker.n_refresh > 0  # the first continuation crosses boundaries


def test_batched_choices_equal_one_at_a_time(tiny):
    _, lm, _, policy = tiny
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    reqs = [req(ctx, " " + e) for e in ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                         "is holding a rubik's cube.", "starts pulling up roofing on a roof.")]
    reqs += [req("Another context entirely", " with its own ending"), req(ctx, " again.")]
    # items whose contexts have the same token length as others: packed into shared batches
    reqs += [req(f"Item {w}: the man picks up the", " " + e) for w in ("one", "two", "three") for e in ("ball.", "cup of tea")]
    reqs += [req("", " empty context"), req("Nothing to score", "")]
    h1 = SOLHarnessLM(lm, None, (1, 1, 1), 4, progress=False)
    rows = [h1.encode_pair(*r.args) for r in reqs]
    assert any(len({tuple(rows[i][0]) for i in b}) > 1 for b in plan_batches(rows, 16))  # contexts do mix
    res = {}
    for bs in (1, 4, 16):
        h = SOLHarnessLM(lm, make_scheduler("policy", lm, policy), (0.25, 0.5, 0.25), 4, batch_size=bs,
                         progress=False)
        res[bs] = h.loglikelihood(reqs)
        assert h.tracker.n_requests == len(reqs) - 1  # the empty continuation records nothing
    assert res[1][-1] == (0.0, True)
    for bs in (4, 16):
        for (a, ga), (b, gb) in zip(res[1], res[bs]):
            assert a == pytest.approx(b, abs=ATOL) and ga == gb


def test_plan_batches_packing():
    # (context ids, continuation ids); items = rows with the same context
    rows = [([1, 2, 3], [9] * 5)] * 4 + [([4, 5, 6], [9] * 2)] * 4 + [([7, 8], [9])] * 3 + [([1, 2, 3], [])] \
        + [([5, 5, 5], [9] * 3)] * 9
    for bs in (1, 3, 4, 8, 64):
        batches = plan_batches(rows, bs)
        flat = sorted(i for b in batches for i in b)
        assert flat == [i for i, (_, c) in enumerate(rows) if c]  # every non-empty row exactly once
        for b in batches:
            assert 1 <= len(b) <= bs and len({len(rows[i][0]) for i in b}) == 1
        if bs >= 4:  # an item of <= bs rows is never split
            for ctx in ([1, 2, 3], [4, 5, 6], [7, 8]):
                owners = {k for k, b in enumerate(batches) for i in b if rows[i][0] == ctx and rows[i][1]}
                assert len(owners) == 1
    b64 = plan_batches(rows, 64)
    assert [len(rows[b[0]][0]) for b in b64] == [2, 3]  # shortest contexts first, one batch per length
    assert b64[1][:4] == [4, 5, 6, 7]  # within a length, the item with the shorter continuations first


def test_context_left_truncated(tiny):
    _, lm, ref, _ = tiny
    h = SOLHarnessLM(lm, None, (1, 1, 1), 4, max_length=12, progress=False)
    ctx, cont = "one two three four five six seven eight nine ten eleven twelve", " thirteen fourteen"
    (logp, _), = h.loglikelihood([req(ctx, cont)])
    c, k = h.encode_pair(ctx, cont)
    c = c[-(12 + 1 - len(k)):]
    assert len(c) + len(k) - 1 == 12
    assert math.isclose(logp, plain_sum_logp(ref, c, k), abs_tol=ATOL)


@pytest.mark.parametrize("max_length", [2048, 7])
def test_loglikelihood_rolling_dense_equals_plain(tiny, max_length):
    _, lm, ref, _ = tiny
    h = SOLHarnessLM(lm, make_scheduler("dense", lm), (1, 1, 1), 4, max_length=max_length, progress=False)
    text = "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith slipped in."
    (total,) = h.loglikelihood_rolling([req(text)])
    toks = lm.tokenizer(text, add_special_tokens=False).input_ids
    windows = h.rolling_windows(text)
    assert (len(windows) == 1) == (max_length >= len(toks))
    assert sum(len(p) for _, p in windows) == len(toks)  # every token predicted exactly once
    expected = sum(plain_sum_logp(ref, list(c), list(p)) for c, p in windows)
    assert math.isfinite(total) and math.isclose(total, expected, abs_tol=ATOL)
    if max_length >= len(toks):  # one window: log p(text | prefix token) from one plain forward
        assert math.isclose(total, plain_sum_logp(ref, [h.prefix_token_id], toks), abs_tol=ATOL)


def test_loglikelihood_rolling_with_policy_is_finite(tiny):
    _, lm, _, policy = tiny
    h = SOLHarnessLM(lm, make_scheduler("policy", lm, policy), (0.25, 0.5, 0.25), 4, max_length=16, progress=False)
    vals = h.loglikelihood_rolling([req("A short document about cats and dogs living together in peace."), req("")])
    assert math.isfinite(vals[0]) and vals[0] < 0 and vals[1] == 0.0
    assert h.tracker.n_eff > 0


def test_generate_until_honours_request(tiny):
    _, lm, _, policy = tiny
    h = SOLHarnessLM(lm, make_scheduler("policy", lm, policy), (0.25, 0.5, 0.25), 4, progress=False)
    free = SOLHarnessLM(lm, None, (1, 1, 1), 4, progress=False)
    (full,) = free.generate_until([req("Once upon a time", {"until": ["@@never@@"], "max_gen_toks": 12})])
    ids = lm.tokenizer(full, add_special_tokens=False).input_ids
    assert 0 < len(ids) <= 13
    stop = full.strip().split(" ")[1] if len(full.strip().split(" ")) > 1 else full.strip()[:2]
    (cut,) = free.generate_until([req("Once upon a time", {"until": [stop], "max_gen_toks": 12})])
    assert stop not in cut and full.startswith(cut)
    (short,) = h.generate_until([req("Once upon a time", {"max_gen_toks": 3})])
    assert len(lm.tokenizer(short, add_special_tokens=False).input_ids) <= 4
    assert h.tracker.n_steps <= 3


# ---- tasks and metrics ----------------------------------------------------------------------------------
def _load_task_utils(name):
    spec = importlib.util.spec_from_file_location(f"_t_{name}", LOCAL_TASKS_DIR / name / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hellaswag_local_data_and_preprocessing():
    hs = _load_task_utils("hellaswag_local")
    items = hs.read_items(hs.DEFAULT_FILE)
    assert len(items) == 10042
    doc = hs.process_doc(items[0])
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][3] == "starts pulling up roofing on a roof." and doc["gold"] == 3
    # lm-eval's preprocessing drops WikiHow [bracketed] artifacts
    wiki = next(hs.process_doc(it) for it in items if "[" in it["ctx"])
    assert "[" not in wiki["query"] and "  " not in wiki["query"]
    assert hs.capitalize_last_fragment("A b. c d") == "A b. C d"
    assert hs.capitalize_last_fragment("A b. C d") == "A b. C d"


def test_task_manager_local_and_unknown(monkeypatch, tmp_path):
    tm = make_task_manager(["tiny_mc_local", "hellaswag_local"])
    assert {"tiny_mc_local", "hellaswag_local"} <= set(tm.all_tasks)
    monkeypatch.setattr("utils.lm_eval_adapter.builtin_task_names", lambda: {"hellaswag", "piqa", "arc_easy"})
    with pytest.raises(TaskNameError) as e:
        make_task_manager(["hellaswag_locl"])
    msg = str(e.value)
    assert "\n" not in msg and "hellaswag_local" in msg and "hellaswag_locl" in msg


def test_accuracy_extraction_order():
    assert task_accuracy({"acc,none": 0.3, "acc_norm,none": 0.4})[1] == 0.4
    assert task_accuracy({"acc,none": 0.3, "acc_stderr,none": 0.1}) == ("acc,none", 0.3)
    assert task_accuracy({"exact_match,strict-match": 0.2, "alias": "x"}) == ("exact_match,strict-match", 0.2)
    assert task_accuracy({"word_perplexity,none": 12.0}) == ("word_perplexity,none", 12.0)
    s = accuracy_summary({"results": {"g": {"acc,none": 0.5}, "a": {"acc,none": 0.2}, "b": {"acc_norm,none": 0.6}},
                          "groups": {"g": {}}})
    assert s["macro"] == pytest.approx(0.4) and s["per_task"]["g"] == 0.5


def test_simple_evaluate_tiny_mc(tiny):
    import lm_eval

    _, lm, _, policy = tiny
    tm = make_task_manager(["tiny_mc_local"])
    h = SOLHarnessLM(lm, make_scheduler("policy", lm, policy), (0.25, 0.5, 0.25), 4, progress=False)
    res = lm_eval.simple_evaluate(model=h, tasks=["tiny_mc_local"], limit=4, task_manager=tm, num_fewshot=0,
                                  log_samples=False)
    block = res["results"]["tiny_mc_local"]
    assert 0.0 <= block["acc,none"] <= 1.0 and 0.0 <= block["acc_norm,none"] <= 1.0
    acc = accuracy_summary(res)
    assert acc["metric"]["tiny_mc_local"] == "acc_norm,none" and acc["macro"] == block["acc_norm,none"]
    assert h.tracker.n_requests == 16  # 4 docs x 4 choices, one call each


# ---- CLI --------------------------------------------------------------------------------------------------
def _cli(args, env=None):
    return subprocess.run([sys.executable, str(REPO / "eval_downstream.py"), *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def _main(args, capsys):
    """eval_downstream.main in-process (saves the interpreter start): (exit code, stdout, stderr)."""
    import eval_downstream

    try:
        rc = eval_downstream.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_bad_inputs(ckpt_dir, tmp_path, monkeypatch, capsys):
    r = _cli(["--ckpt_dir", str(tmp_path / "missing"), "--tasks", "tiny_mc_local"])  # the real exit path once
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "checkpoint directory not found" in r.stderr
    rc, _, err = _main(["--ckpt_dir", str(ckpt_dir), "--tgt_keep", "1.5"], capsys)
    assert rc == 2 and err.strip() == "error: --tgt_keep must be in [0, 1], got 1.5"
    rc, _, err = _main(["--ckpt_dir", str(ckpt_dir), "--limit", "0"], capsys)
    assert rc == 2 and err.strip() == "error: --limit must be > 0, got 0.0"
    # unknown task: a pre-seeded name cache stands in for lm-eval's 15 s task index
    monkeypatch.setenv("SOL_CACHE", str(tmp_path / "cache"))
    path = _names_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(["hellaswag", "piqa", "arc_easy"]))
    rc, _, err = _main(["--ckpt_dir", str(ckpt_dir), "--tasks", "helaswag_local"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: unknown task")
    assert "hellaswag_local" in lines[0]


def test_cli_policy_fixed_export(ckpt_dir, tmp_path, capsys):
    pytest.importorskip("utils.baselines")
    out = tmp_path / "km" / "policy.json"
    rc, stdout, err = _main(["--ckpt_dir", str(ckpt_dir), "--tasks", "tiny_mc_local", "--limit", "2",
                             "--episode_len", "4", "--tgt_keep", "0.25", "--fixed_from_policy",
                             "--export_sparsity_json", str(out), "--no_progress"], capsys)
    assert rc == 0, err[-2000:]
    km = json.loads(out.read_text())
    assert set(km) == {"policy", "fixed_baseline", "policy_minus_fixed"}
    d = km.pop("policy_minus_fixed")["tiny_mc_local"]
    acc_p = km["policy"]["accuracy"]["per_task"]["tiny_mc_local"]
    acc_f = km["fixed_baseline"]["accuracy"]["per_task"]["tiny_mc_local"]
    assert d["n_items"] == 2 and d["diff"] == pytest.approx(acc_p - acc_f)  # per-item mean = the accuracies' gap
    assert d["lo"] <= d["diff"] <= d["hi"]
    for block in km.values():
        assert 0.0 <= block["accuracy"]["per_task"]["tiny_mc_local"] <= 1.0
        assert block["accuracy"]["macro"] is not None
        for k in ("token_keep_avg", "prune_keep_avg", "quant_ratio_avg", "attn_keep_realised",
                  "channel_keep_realised", "flops_ratio", "n_steps"):
            assert isinstance(block[k], (int, float)), k
        assert block["n_steps"] > 0
    # the fixed baseline targets the policy's realised averages
    pol, fix = km["policy"], km["fixed_baseline"]
    assert fix["targets"]["keep"] == pytest.approx(pol["token_keep_avg"])
    assert abs(fix["token_keep_avg"] - pol["token_keep_avg"]) < 0.15
    assert "policy" in stdout and "fixed_baseline" in stdout and "paired 95% CI" in stdout


@pytest.mark.smollm2
@pytest.mark.slow
def test_dense_adapter_matches_lm_eval_hf_model_on_hellaswag(tmp_path):
    """Our dense scoring through the runtime gives lm-eval's own HF model's per-choice log-likelihoods
    (and accuracies) on a few HellaSwag items with SmolLM2."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from utils.model import SMOLLM2_ALIAS

    cfg = load_config("official_configs/cpu_smollm2_joint.yml", ["device=cpu"])
    model, tok = load_lm(SMOLLM2_ALIAS)
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    lm = ControlledLM.from_config(cfg, model, tok)
    tm = make_task_manager(["hellaswag_local"])
    kw = dict(tasks=["hellaswag_local"], limit=3, task_manager=tm, num_fewshot=0, log_samples=True)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=plain, tokenizer=tok, batch_size=4, device="cpu"), **kw)
    ours = lm_eval.simple_evaluate(model=SOLHarnessLM(lm, make_scheduler("dense", lm), (1, 1, 1), 16, batch_size=4,
                                                      progress=False), **kw)
    for a, b in zip(ref["samples"]["hellaswag_local"], ours["samples"]["hellaswag_local"]):
        la = [r[0][0] for r in a["resps"]]
        lb = [r[0][0] for r in b["resps"]]
        assert lb == pytest.approx(la, abs=2e-3)
    for m in ("acc,none", "acc_norm,none"):
        assert ours["results"]["hellaswag_local"][m] == ref["results"]["hellaswag_local"][m]
