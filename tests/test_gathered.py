"""Gathered execution (utils/gathered.py) against the simulated one and against independent computations.

The gathered mode must give the simulated mode's logits (atol 1e-4, float32) for every criterion, κ, ρ and
bit-width of the grid, on the dense prefill and on several decode steps, at batch 1 and with different
actions per row; its kernels are checked against plain loops / masked dense products.
"""
from __future__ import annotations

import copy

import pytest
import torch

from utils import gathered
from utils.actions import ActionSpace
from utils.attention import ceil_count, quest_page_bounds, topk_by_threshold
from utils.cli import SOLError
from utils.controls import Controls
from utils.lm import ControlledLM
from utils.model import load_lm

TS, TW, PAGE = 4, 2, 4
CTX, STEPS = 30, 5
SPACE = ActionSpace.build([0.25, 0.5, 1.0], ["s40", "s60", "s100"], ["q4", "q8", "q16"])
CRIT = [("recency", "per_head", False), ("relevancy", "per_head", False), ("relevancy", "per_layer", False),
        ("quest", "per_head", False), ("quest", "per_head", True), ("quest", "per_kv_head", False),
        ("quest", "per_kv_head", True)]
CRIT_IDS = ["recency", "relevancy-head", "relevancy-layer", "quest", "quest-sinkwin", "quest-kvhead",
            "quest-kvhead-sinkwin"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_lm("tiny-random-llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (3, CTX + STEPS), generator=g)
    return model, tok, ids


def tiers(crit) -> tuple[str, str]:
    """(relevancy_tier, quest_tier) of a CRIT entry: its tier is its own criterion's."""
    return (crit[1], "per_head") if crit[0] != "quest" else ("per_head", crit[1])


def pair(tiny, crit, space=SPACE) -> dict[str, ControlledLM]:
    """A simulated and a gathered ControlledLM of the same weights (separate copies: installing patches them)."""
    model, tok, _ = tiny
    rel, qt = tiers(crit)
    return {e: ControlledLM(copy.deepcopy(model), tok, space, crit[0], TS, TW, PAGE, rel, crit[2], execution=e,
                            quest_tier=qt)
            for e in ("simulated", "gathered")}


def run(lm: ControlledLM, ids: torch.Tensor, actions) -> tuple[torch.Tensor, list]:
    """Prefill ids[:, :CTX], then STEPS decode steps under `actions` ([B] or a list of [B] per step):
    (logits [STEPS + 1, B, V] prefill first, usages)."""
    cache, _, logits = lm.prefill(ids[:, :CTX])
    out, usages = [logits], []
    for s in range(STEPS):
        a = actions[s] if isinstance(actions, list) else actions
        o = lm.step(cache, ids[:, CTX + s], a)
        out.append(o.logits)
        usages.append(o.usage)
    return torch.stack(out), usages


def assert_same(sim, gat) -> None:
    (ls, us), (lg, ug) = sim, gat
    torch.testing.assert_close(lg, ls, atol=ATOL, rtol=0)
    for a, b in zip(us, ug):
        assert a.effective == b.effective
        torch.testing.assert_close(b.attn_keep, a.attn_keep, atol=1e-6, rtol=0)
        assert torch.equal(b.channel_keep, a.channel_keep)
        assert torch.equal(b.keep, a.keep) and torch.equal(b.prune, a.prune) and torch.equal(b.qratio, a.qratio)


# ==== validation and layout =============================================================================

def test_execution_value_checked(tiny):
    model, tok, _ = tiny
    with pytest.raises(SOLError, match="unknown execution 'fast'; expected one of simulated, gathered"):
        ControlledLM(copy.deepcopy(model), tok, SPACE, execution="fast")
    with pytest.raises(gathered.ExecutionError):
        Controls("recency", TS, TW, PAGE, execution="")
    assert ControlledLM(copy.deepcopy(model), tok, SPACE).execution == "simulated"


def test_layout_mlp_keeps_weights_and_shares_memory(tiny):
    model, _, _ = tiny
    mlp = copy.deepcopy(model.model.layers[0].mlp)
    ref = copy.deepcopy(mlp)
    gathered.layout_mlp(mlp)
    I = mlp.gate_proj.weight.shape[0]
    w = mlp._sol_w_in
    assert w.is_contiguous() and w.shape == (model.config.hidden_size, 2 * I)
    assert torch.equal(mlp.gate_proj.weight, ref.gate_proj.weight)
    assert torch.equal(mlp.up_proj.weight, ref.up_proj.weight)
    assert mlp.gate_proj.weight.data_ptr() == w.data_ptr()  # a view, not a second copy
    x = torch.randn(2, 3, model.config.hidden_size)
    torch.testing.assert_close(mlp(x), ref(x), atol=1e-6, rtol=0)  # the Linear layers still work on the views


def test_layout_attention_keeps_weights_and_shares_memory(tiny):
    from utils import fast_decode
    model, _, _ = tiny
    attn = copy.deepcopy(model.model.layers[0].self_attn)
    ref = copy.deepcopy(attn)
    fast_decode.layout_attention(attn)
    w = attn._sol_w_qkv
    H = model.config.hidden_size
    assert w.is_contiguous() and w.shape == (H, sum(p.weight.shape[0] for p in (ref.q_proj, ref.k_proj, ref.v_proj)))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(attn, name).weight, getattr(ref, name).weight)
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()  # a view, not a second copy
    assert attn.v_proj.weight.data_ptr() == w[:, -ref.v_proj.weight.shape[0]:].data_ptr()
    assert attn.o_proj.weight.data_ptr() == attn._sol_w_o.data_ptr() and attn._sol_w_o.is_contiguous()
    x = torch.randn(2, 3, H)
    for name in ("q_proj", "v_proj", "o_proj"):  # the Linear layers still work on the views
        torch.testing.assert_close(getattr(attn, name)(x), getattr(ref, name)(x), atol=1e-6, rtol=0)


def test_layout_lm_head_keeps_the_tie(tiny):
    """The LM head laid out input-major stays tied to the input embedding (one copy) and gives the same logits
    and embeddings."""
    from utils import fast_decode
    model, _, ids = tiny
    m = copy.deepcopy(model)
    fast_decode.layout_lm_head(m)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    head, emb = m.get_output_embeddings().weight, m.get_input_embeddings().weight
    assert torch.equal(head, model.get_output_embeddings().weight) and head.t().is_contiguous()
    assert (emb is head) == tied
    torch.testing.assert_close(m(ids[:1]).logits, model(ids[:1]).logits, atol=1e-5, rtol=0)


def test_fast_decode_step_is_the_hf_forward(tiny, monkeypatch):
    """Gathered decode steps run `fast_decode.decode_hidden` (not LlamaModel.forward), and it gives the Hugging
    Face forward's hidden states and caches (same controls, same weights) at batch 1 and 3, dense and controlled."""
    from utils import fast_decode
    _, _, ids = tiny
    lm = pair(tiny, CRIT[3])["gathered"]  # QUEST: reads the cache's page bounds as it grows
    calls = []
    real = fast_decode.decode_hidden
    monkeypatch.setattr(fast_decode, "decode_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    for rows, acts in ((1, None), (1, torch.tensor([SPACE.index(0.25, 0.4, 8)])),
                       (3, torch.tensor([SPACE.index(0.25, 0.4, 8), SPACE.index(0.5, 1.0, 4), SPACE.dense_idx]))):
        fast = run(lm, ids[:rows], acts)
        calls_fast = len(calls)
        monkeypatch.setattr(lm, "execution", "gathered-hf")  # any other value takes the Hugging Face forward
        hf = run(lm, ids[:rows], acts)
        monkeypatch.setattr(lm, "execution", "gathered")
        assert calls_fast == STEPS and len(calls) == STEPS  # the fast step ran every decode step, and only there
        calls.clear()
        torch.testing.assert_close(fast[0], hf[0], atol=1e-5, rtol=0)
        for a, b in zip(fast[1], hf[1]):
            assert torch.equal(a.channel_keep, b.channel_keep)
            torch.testing.assert_close(a.attn_keep, b.attn_keep, atol=1e-7, rtol=0)


# ==== kernels against independent computations ==========================================================

@pytest.mark.parametrize("n_bags", [1, 2, 3, 7, 8])
def test_gathered_gate_up_vs_loop_and_masked_matmul(n_bags):
    g = torch.Generator().manual_seed(1)
    B, D, N = 4, 40, 24
    x = torch.randn(B, D, generator=g)
    w = torch.randn(D, N, generator=g)
    b = torch.randn(N, generator=g)
    keep = torch.rand(B, D, generator=g) < torch.tensor([0.1, 0.4, 0.9, 1.0])[:, None]
    keep[0] = False
    keep[0, 5] = True  # a row with a single channel
    got = gathered.gathered_gate_up(x, keep, w, b, n_bags)
    loop = torch.zeros(B, N, dtype=torch.float64)
    for r in range(B):
        for c in range(D):
            if keep[r, c]:
                loop[r] += x[r, c].double() * w[c].double()
    loop += b.double()
    torch.testing.assert_close(got.double(), loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, (x * keep) @ w + b, atol=1e-5, rtol=0)
    got1 = gathered.gathered_gate_up(x[2:3], keep[2:3], w, None, n_bags)
    torch.testing.assert_close(got1, (x[2:3] * keep[2:3]) @ w, atol=1e-5, rtol=0)
    for r in range(B):  # the single-row kernel of the batch-1 fast path
        row = gathered.gather_gemv(x[r], keep[r].nonzero().flatten(), w, b, n_bags)
        torch.testing.assert_close(row.double(), loop[r], atol=1e-5, rtol=0)


def _can_build_native() -> bool:
    import shutil
    return shutil.which("c++") is not None and shutil.which("ninja") is not None


def _use_path(path: str, monkeypatch) -> None:
    """Make the one-row kernels take the native kernel (which must build where a compiler and ninja exist)
    or the embedding_bag fallback."""
    from utils import native
    if path == "native":
        if not _can_build_native():
            pytest.skip("no C++ compiler or ninja: the native kernel cannot be built here")
        assert native.gather_kernel() is not None
    else:
        monkeypatch.setenv("SOL_NATIVE_KERNEL", "0")
        assert native.gather_kernel() is None


def test_native_build_announces_itself_only_when_not_cached(tmp_path, monkeypatch, capsys):
    """A first build (nothing in the extension folder) prints one line before the ~40 s compile; a cached build
    prints nothing; a failed build falls back with one note."""
    from torch.utils import cpp_extension
    from utils import native
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loaded.append(kw["name"]) or "module")
    assert native._build() == "module" and loaded == [native.NAME]
    assert "building the native gather kernel" in capsys.readouterr().err
    (tmp_path / native.NAME).mkdir(exist_ok=True)  # the first call made the folder (torch does)
    (tmp_path / native.NAME / f"{native.NAME}.so").write_bytes(b"")
    assert native._build() == "module" and capsys.readouterr().err == ""

    def fail(**kw):
        raise RuntimeError("no compiler\nmore")
    monkeypatch.setattr(cpp_extension, "load", fail)
    assert native._build() is None
    err = capsys.readouterr().err
    assert "unavailable (no compiler)" in err and "building" not in err


@pytest.mark.parametrize("path", ["native", "embedding_bag"])
def test_dense_gemv_vs_float64(path, monkeypatch):
    """`dense_gemv` (the gathered execution's dense products: the native every-row kernel for one float32 row,
    else a matmul) against a float64 product, with and without bias, for one row (several leading shapes), three
    rows and bfloat16, over 1-3 threads (rows split over the threads)."""
    _use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    for D, N in [(3, 5), (40, 24), (576, 960)]:
        w, b = torch.randn(D, N, generator=g), torch.randn(N, generator=g)
        for shape in ((D,), (1, D), (1, 1, D), (3, 1, D)):
            x = torch.randn(*shape, generator=g)
            ref = x.double() @ w.double()
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                try:
                    got, got_b = gathered.dense_gemv(x, w), gathered.dense_gemv(x, w, b)
                finally:
                    torch.set_num_threads(threads)
                assert got.shape == ref.shape and got.dtype == torch.float32
                torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(got_b.double(), ref + b.double(), atol=1e-4, rtol=1e-5)
    xb, wb = torch.randn(1, 1, 40, generator=g).bfloat16(), torch.randn(40, 24, generator=g).bfloat16()
    got = gathered.dense_gemv(xb, wb)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 24)
    torch.testing.assert_close(got.double(), xb.double() @ wb.double(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("path", ["native", "embedding_bag"])
def test_one_row_kernel_paths_vs_loop(path, monkeypatch):
    """Both one-row kernels (the native C++ one and the embedding_bag fallback) against a float64 loop, for
    kept counts around the native kernel's 4-row unroll (rows split over 1, 2 or 3 threads) and odd output
    widths."""
    from utils import native
    _use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    for D, N in [(40, 24), (64, 600), (576, 6144)]:
        x, w, b = torch.randn(D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
        for n in (1, 3, 4, 5, 8, 9, 13, 17, D // 2, D):
            idx = torch.randperm(D, generator=g)[:n].sort().values
            loop = torch.zeros(N, dtype=torch.float64)
            for c in idx.tolist():
                loop += x[c].double() * w[c].double()
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                try:
                    got = gathered.gather_gemv(x, idx, w, b, 4)
                finally:
                    torch.set_num_threads(threads)
                torch.testing.assert_close(got.double(), loop + b.double(), atol=1e-4, rtol=1e-5)
    for kth in (1, 2, D // 2, D):  # selection + gather: the channels at or above the kth smallest |x|
        thr = x.abs().sort().values[kth - 1]
        kept = (x.abs() >= thr).nonzero().flatten().tolist()
        loop = sum((x[c].double() * w[c].double() for c in kept), torch.zeros(N, dtype=torch.float64))
        got, n = gathered.select_gather_gemv(x, kth, w, b, 4)
        assert n == len(kept)
        torch.testing.assert_close(got.double(), loop + b.double(), atol=1e-4, rtol=1e-5)
    if path == "native":
        kernel = native.gather_kernel()
        with pytest.raises(RuntimeError, match="out of range"):
            kernel.gather_gemv(x, torch.tensor([D]), w)
        with pytest.raises(RuntimeError, match="kth out of range"):
            kernel.select_gather_gemv(x, D + 1, w)


@pytest.mark.parametrize("path", ["native", "embedding_bag"])
@pytest.mark.parametrize("ties", ["none", "at_threshold", "all_equal"])
def test_one_row_gate_up_keeps_the_simulated_channels(ties, path, monkeypatch):
    """The batch-1 fast path (`Controls._gate_up_one_row`: the native select + gather, or the ATen ops) keeps
    the channels `prune_channels` keeps, ties at the threshold included, and gives the masked dense product."""
    from utils.mlp_controls import prune_channels
    _use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(3)
    D, N = 40, 12
    w, b = torch.randn(D, N, generator=g), torch.randn(N, generator=g)
    x = torch.randn(1, 1, D, generator=g)
    if ties == "at_threshold":  # the 17th and 18th largest |x| take the 16th's value (one with its sign flipped)
        order = x.abs().flatten().argsort(descending=True)
        v = x.view(-1)[order[15]].abs()
        x.view(-1)[order[16:18]] = torch.stack([-v, v])
    elif ties == "all_equal":
        x = torch.full((1, 1, D), -0.25)
    for rho in (0.1, 0.4, 0.9):
        ctl = Controls("recency", TS, TW, PAGE, prune_levels=[rho], execution="gathered")
        ctl.set(torch.ones(1), torch.tensor([rho]), torch.full((1,), 16), kv_len=CTX)
        got = ctl.gate_up(x, w, b)
        ref, kept = prune_channels(x, torch.tensor([rho]), [rho])
        assert int(ctl.channel_sum) == int(kept)
        torch.testing.assert_close(got, ref @ w + b, atol=1e-5, rtol=0)
    if ties == "at_threshold":  # ρ 0.4 keeps 16, and the tie brings two more
        assert int(kept_at(x, 0.4)) == 18


def kept_at(x: torch.Tensor, rho: float) -> torch.Tensor:
    from utils.mlp_controls import prune_channels
    return prune_channels(x, torch.tensor([rho]), [rho])[1]


def test_gather_rows_from_buffer_views():
    g = torch.Generator().manual_seed(2)
    buf = torch.randn(2, 3, 50, 8, generator=g)
    x = buf[:, :, :37]  # a cache view: strided batch/head dims
    idx = torch.randint(0, 37, (2, 3, 11), generator=g)
    want = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(gathered.gather_rows(x, idx), want)
    assert torch.equal(gathered.gather_rows(x.transpose(-1, -2).contiguous().transpose(-1, -2), idx), want)


def test_gather_pages_from_whole_buffers():
    """Whole pages of a cache buffer, the last one running past the filled length, equal a loop over
    positions; a buffer that does not tile into pages is refused (None: the caller gathers rows)."""
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(2, 3, 64, 8, generator=g)
    pidx = torch.stack([torch.randperm(16, generator=g)[:5].sort().values for _ in range(6)]).view(2, 3, 5)
    want = torch.stack([torch.stack([buf[b, h, [p * 4 + i for p in pidx[b, h].tolist() for i in range(4)]]
                                     for h in range(3)]) for b in range(2)])
    assert torch.equal(gathered.gather_pages(buf, pidx, 4), want)
    assert gathered.gather_pages(buf[:, :, :60], pidx, 16) is None  # not contiguous
    assert gathered.gather_pages(torch.randn(1, 1, 60, 8), pidx[:1, :1], 16) is None  # 60 % 16


def test_cache_capacity_tiles_pages(tiny):
    """Growable buffers hold a multiple of 64 positions, so QUEST's pages (any size dividing 64) tile them."""
    model, tok, ids = tiny
    lm = ControlledLM(copy.deepcopy(model), tok, SPACE, "quest", TS, TW, PAGE, execution="gathered")
    cache, _, _ = lm.prefill(ids[:1, :CTX])
    for _ in range(3):
        lm.step(cache, ids[:1, CTX], torch.tensor([0]))
        assert all(layer.padded()[0].shape[2] % 64 == 0 for layer in cache.layers)


@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
def test_gathered_attention_equals_simulated_with_masks(crit):
    """Direct calls: the same keys kept and the same output as the simulated attention, with and without an
    attention mask, rows with different κ (recency's spans then differ per row)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, K, D = 3, 4, 2, 37, 8
    q = torch.randn(B, Hq, 1, D, generator=g)
    buf_k, buf_v = torch.randn(B, Hkv, K + 9, D, generator=g), torch.randn(B, Hkv, K + 9, D, generator=g)
    k, v = buf_k[:, :, :K], buf_v[:, :, :K]
    kappa = torch.tensor([0.25, 0.5, 1.0])
    mask = torch.ones(B, 1, 1, K, dtype=torch.bool)
    mask[0, 0, 0, 10:14] = False
    mask[1, 0, 0, 30] = False
    mask[2, 0, 0, 20] = False
    for m in (None, mask, torch.where(mask, 0.0, float("-inf"))):
        outs = {}
        for e in ("simulated", "gathered"):
            ctl = Controls(crit[0], TS, TW, PAGE, tiers(crit)[0], crit[2], tiers(crit)[1],
                           keep_levels=(0.25, 0.5, 1.0), execution=e)
            ctl.set(kappa, torch.ones(B), torch.full((B,), 16), K)
            out, _ = ctl.sparse_decode_attention(q, k, v, m, D ** -0.5)
            outs[e] = (out, ctl.key_frac_sum)
        torch.testing.assert_close(outs["gathered"][0], outs["simulated"][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(outs["gathered"][1], outs["simulated"][1], atol=1e-6, rtol=0)
    assert outs["gathered"][1][2].item() < 1.0  # the mask removed keys of the κ = 1 row too


# ==== the controlled tiny model: gathered == simulated ==================================================

@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
def test_every_action_batch1_matches_simulated(tiny, crit):
    _, _, ids = tiny
    lms = pair(tiny, crit)
    dense = run(lms["simulated"], ids[:1], None)[0]
    for a in range(len(SPACE)):
        acts = torch.tensor([a])
        sim, gat = run(lms["simulated"], ids[:1], acts), run(lms["gathered"], ids[:1], acts)
        assert_same(sim, gat)
        if a != SPACE.dense_idx:  # the action really changed the computation
            assert (gat[0][1:] - dense[1:]).abs().max().item() > 2 * ATOL, SPACE.tags[a]


@pytest.mark.parametrize("crit", CRIT, ids=CRIT_IDS)
@pytest.mark.parametrize("limit", [1.0, float("inf"), 0.0], ids=["auto", "always-gather", "never-gather"])
def test_batch_rows_with_different_actions_match_simulated(tiny, crit, limit):
    """Batch 2 and 3, every row its own action (changing per step), including dense rows: the gathered MLP
    with per-row bags (`limit` inf forces it even where a masked dense product reads less) or the masked
    dense fallback (`limit` 0, at batch 1 too), attention padded to the largest kept set."""
    _, _, ids = tiny
    lms = pair(tiny, crit)
    lms["gathered"].controls.gather_limit = limit
    A = SPACE.index
    schedules = [
        [torch.tensor([A(0.25, 0.4, 4)])] * STEPS,
        [torch.tensor([A(0.25, 0.4, 4), A(0.5, 0.6, 16)])] * STEPS,
        [torch.tensor([A(0.25, 0.4, 8), SPACE.dense_idx])] * STEPS,
        [torch.tensor([(s * 5 + r * 11) % len(SPACE) for r in range(3)]) for s in range(STEPS)],
        [torch.tensor([A(0.25, 1.0, 16), A(0.5, 1.0, 4), A(1.0, 0.4, 16)])] * STEPS,
    ]
    for sched in schedules:
        B = sched[0].shape[0]
        assert_same(run(lms["simulated"], ids[:B], sched), run(lms["gathered"], ids[:B], sched))


def test_gathered_kernels_are_the_ones_running(tiny, monkeypatch):
    """The gathered mode's per-layer path really takes the gathered kernels (not a silent simulated fallback);
    batch-1 steps would take the native step otherwise (tested on its own below), so it is switched off here."""
    from utils import fast_decode, native
    monkeypatch.setattr(fast_decode, "NATIVE_STEP", False)
    _, _, ids = tiny
    calls: dict[str, int] = {}
    for name in ("select_gather_gemv", "gathered_gate_up", "union_gate_up", "recency_attention",
                 "relevancy_attention", "quest_attention"):
        fn = getattr(gathered, name)

        def spy(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(gathered, name, spy)
    acts = torch.tensor([SPACE.index(0.25, 0.4, 4)])
    for crit in CRIT[:2] + CRIT[3:4]:
        run(pair(tiny, crit)["gathered"], ids[:1], acts)
    L = 2 * STEPS  # layers × decode steps
    assert calls == {"select_gather_gemv": 3 * L, "recency_attention": L, "relevancy_attention": L, "quest_attention": L}
    calls.clear()
    run(pair(tiny, CRIT[0])["gathered"], ids[:2], torch.tensor([SPACE.index(0.25, 0.4, 4), SPACE.index(1.0, 0.4, 16)]))
    # 2 rows at ρ=0.4: one native pass over the union of their kept channels (per-row bags where it cannot run)
    assert calls == ({"union_gate_up": L, "recency_attention": L} if native.gather_kernel() is not None
                     else {"union_gate_up": L, "gathered_gate_up": L, "recency_attention": L})


@pytest.mark.parametrize("criteria", ["recency", "quest"])
def test_dense_and_short_cache_steps_match(tiny, criteria):
    """actions=None, the dense action and non-effective steps (cache too short) run dense in both modes."""
    _, _, ids = tiny
    lms = pair(tiny, (criteria, "per_head", False))
    sparse = torch.tensor([SPACE.index(0.25, 0.4, 4)] * 2)
    for lm_acts in (None, torch.tensor([SPACE.dense_idx] * 2)):
        assert_same(run(lms["simulated"], ids[:2], lm_acts), run(lms["gathered"], ids[:2], lm_acts))
    res = {}
    for e, lm in lms.items():
        cache, _, _ = lm.prefill(ids[:2, :5])
        res[e] = [lm.step(cache, ids[:2, t], sparse) for t in range(5, 9)]  # kv_len 6, 7 dense; 8, 9 controlled
    for s, g in zip(res["simulated"], res["gathered"]):
        assert s.usage.effective == g.usage.effective
        torch.testing.assert_close(g.logits, s.logits, atol=ATOL, rtol=0)
    assert [o.usage.effective for o in res["gathered"]] == [False, False, True, True]


def test_gathered_quest_pages_follow_growing_cache(tiny):
    """Long decode across page boundaries and a cache reallocation: the incrementally kept page bounds and
    the gathered pages stay in step with the simulated mode."""
    from utils.kv_cache import SPARE_TOKENS

    model, tok, _ = tiny
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 2000, (1, 12 + SPARE_TOKENS + 6), generator=g)
    acts = torch.tensor([SPACE.index(0.25, 0.6, 8)])
    out = {}
    for e, lm in pair(tiny, ("quest", "per_head", True)).items():
        cache, _, _ = lm.prefill(ids[:, :12])
        out[e] = torch.stack([lm.step(cache, ids[:, t], acts).logits for t in range(12, ids.shape[1])])
    torch.testing.assert_close(out["gathered"], out["simulated"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("criteria", ["recency", "relevancy", "quest"])
def test_bfloat16_gathered_agrees(criteria):
    """bfloat16 (the SmolLM2 configs' dtype) takes the same gathered kernels; agreement to bf16 rounding."""
    model, tok = load_lm("tiny-random-llama", "bfloat16")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 2000, (2, CTX + STEPS), generator=g)
    lms = pair((model, tok, ids), (criteria, "per_head", False))
    for acts in (torch.tensor([SPACE.index(0.25, 0.4, 4)]), torch.tensor([SPACE.index(0.5, 0.6, 16)] * 2)):
        B = acts.shape[0]
        (ls, _), (lg, _) = run(lms["simulated"], ids[:B], acts), run(lms["gathered"], ids[:B], acts)
        torch.testing.assert_close(lg, ls, atol=5e-2, rtol=0)


# ==== SmolLM2 (skipped when the embedded model is not installed) =========================================

@pytest.fixture(scope="module")
def smol():
    from utils.model import SMOLLM2_ALIAS, ModelLoadError, smollm2_dir

    try:
        smollm2_dir()
    except ModelLoadError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    model, tok = load_lm(SMOLLM2_ALIAS)
    text = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, " * 3
    ids = tok(text, return_tensors="pt").input_ids[:, :CTX + STEPS]
    return model, tok, torch.cat([ids, ids.flip(1)])


SMOL_SPACE = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q7", "q16"])


def _channel_flip_step(xs: dict[str, list[torch.Tensor]], rho: torch.Tensor, n_layers: int) -> list[int]:
    """Per row, the first decode step at which the two modes kept a different MLP channel set in some layer
    (STEPS if never), from the MLP inputs of every step and layer in call order; asserts that up to there the
    inputs agree to float tolerance and that the swapped channels score within 1e-4 of the threshold (a tie
    that rounding broke differently, not a different selection rule)."""
    first = [STEPS] * rho.shape[0]
    for i, (a, b) in enumerate(zip(xs["simulated"], xs["gathered"])):
        step = i // n_layers
        D = a.shape[-1]
        count = ceil_count(rho, D).clamp(1, D)
        sa, sb = a.abs().amax(1).float(), b.abs().amax(1).float()
        ka = topk_by_threshold(sa, torch.ones_like(sa, dtype=torch.bool), count)
        kb = topk_by_threshold(sb, torch.ones_like(sb, dtype=torch.bool), count)
        for r in range(rho.shape[0]):
            if step >= first[r]:
                continue  # the row's trajectories parted at an earlier tie
            torch.testing.assert_close(b[r], a[r], atol=1e-4, rtol=1e-4)
            if not torch.equal(ka[r], kb[r]):
                thr = sa[r][ka[r]].min()
                assert ((sa[r] - thr).abs()[ka[r] != kb[r]] <= 1e-4 * thr).all()
                first[r] = step
    return first


@pytest.mark.smollm2
@pytest.mark.parametrize("criteria", ["recency", "relevancy", "quest"])
def test_smollm2_gathered_matches_simulated(smol, criteria, monkeypatch):
    """Every κ and ρ level at 16 bits, batch 1 and a batch of 2 with different actions: logits within 1e-4
    on the prefill and every decode step. Both modes select from inputs that agree only to float rounding, so
    a channel sitting at the top-k threshold can swap over 30 layers; the test finds such swaps (and checks
    they are ties) and compares each row up to its first one. (Below 16 bits a rounding boundary of the fake
    quantization does the same, more often: bit-widths are checked layer by layer below.)"""
    model, tok, ids = smol
    A = SMOL_SPACE.index
    plans = [torch.tensor([A(0.1, 0.4, 16)]), torch.tensor([A(0.6, 0.8, 16)]), torch.tensor([A(1.0, 0.4, 16)]),
             torch.tensor([A(0.1, 0.8, 16), A(0.6, 0.4, 16)])]
    res: dict[str, list] = {}
    xs: dict[str, list] = {}
    for e in ("simulated", "gathered"):
        lm = ControlledLM(copy.deepcopy(model), tok, SMOL_SPACE, criteria, TS, TW, PAGE, execution=e)
        mlps = [m for m in lm.model.modules() if hasattr(m, "gate_proj")]
        xs[e] = []
        for m in mlps:  # the MLP inputs of controlled steps (gathered decode steps call the MLP's forward directly)
            m.register_forward_pre_hook(
                lambda mod, args, _xs=xs[e], _ctl=lm.controls: _xs.append(args[0].clone()) if _ctl.active else None,
                prepend=True)
        if e == "gathered":
            from utils import fast_decode
            real = fast_decode.gathered_mlp_forward
            monkeypatch.setattr(fast_decode, "gathered_mlp_forward", lambda mod, x, _xs=xs[e], _ctl=lm.controls: (
                _xs.append(x.clone()) if _ctl.active else None) or real(mod, x))
            monkeypatch.setattr(fast_decode, "MLP_INPUT_HOOK", lambda rec, _xs=xs[e], _ctl=lm.controls: (
                _xs.extend(r.view(1, 1, -1).clone() for r in rec) if _ctl.active else None))  # batch-1 native steps
        res[e] = [run(lm, ids[:a.shape[0]], a) for a in plans]
        n_layers = len(mlps)
        del lm
    per_run = STEPS * n_layers
    compared = 0
    for k, acts in enumerate(plans):
        (ls, us), (lg, ug) = res["simulated"][k], res["gathered"][k]
        sl = slice(k * per_run, (k + 1) * per_run)
        first = _channel_flip_step({e: xs[e][sl] for e in xs}, SMOL_SPACE.prune[acts], n_layers)
        torch.testing.assert_close(lg[0], ls[0], atol=ATOL, rtol=0)  # the prefill
        for r, f in enumerate(first):
            torch.testing.assert_close(lg[1:f + 1, r], ls[1:f + 1, r], atol=ATOL, rtol=0)  # up to the first swap
            compared += f
        for a, b in zip(us, ug):
            torch.testing.assert_close(b.attn_keep, a.attn_keep, atol=1e-6, rtol=0)
    assert compared >= STEPS * 3  # most rows ran their whole decode without a tie


@pytest.mark.smollm2
def test_smollm2_quantized_mlp_layer_by_layer(smol):
    """Each installed MLP (prune + fake quantization hooks vs gather-GEMV + the same hook) on the real inputs
    of a decode step: equal to float tolerance before quantization; after it every element is on the same
    level except the rare ones a float-noise difference moved across a rounding boundary (one level)."""
    model, tok, ids = smol
    lms = {e: ControlledLM(copy.deepcopy(model), tok, SMOL_SPACE, "recency", TS, TW, PAGE, execution=e)
           for e in ("simulated", "gathered")}
    mlps = {e: [m for m in lm.model.modules() if hasattr(m, "gate_proj")] for e, lm in lms.items()}
    cache, _, _ = lms["simulated"].prefill(ids[:1, :CTX])
    xs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: xs.append(args[0].clone()), prepend=True)
             for m in mlps["simulated"]]
    lms["simulated"].step(cache, ids[:1, CTX], torch.tensor([SMOL_SPACE.index(0.6, 0.4, 5)]))
    for h in hooks:
        h.remove()
    assert len(xs) == model.config.num_hidden_layers
    flips = total = 0
    with torch.inference_mode():
        for rho in (0.4, 0.8):
            for bits in (16, 7, 5):
                for i, x in enumerate(xs):
                    y = {}
                    for e, lm in lms.items():
                        lm.controls.set(torch.ones(1), torch.tensor([rho]), torch.tensor([bits]), CTX + 1)
                        y[e] = mlps[e][i](x)
                        lm.controls.clear()
                    if bits == 16:
                        torch.testing.assert_close(y["gathered"], y["simulated"], atol=1e-4, rtol=1e-5)
                        continue
                    step = y["simulated"].abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
                    levels = ((y["gathered"] - y["simulated"]) / step).abs()
                    assert levels.max().item() < 1.01  # at most one level apart
                    flips += int((levels > 0.5).sum())
                    total += levels.numel()
    assert flips <= 1e-3 * total, (flips, total)


# ==== command-line flag =================================================================================

def _main(module: str, args: list[str], capsys) -> tuple[int, str, str]:
    """A script's main() in-process: (exit code, stdout, stderr)."""
    import importlib

    try:
        rc = importlib.import_module(module).main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gen_policy_vs_dense_execution_flag(tiny_ckpt_dir, capsys):
    import re

    base = ["--ckpt_dir", str(tiny_ckpt_dir), "--input_sentence", "The capital of France is", "--generation_tokens",
            "8", "--episode_len", "4", "--tgt_keep", "0.25", "--tgt_prune_keep", "0.5", "--seed", "3"]
    res = {}
    for e in ("simulated", "gathered"):
        rc, out, err = _main("gen_policy_vs_dense", base + ["--execution", e], capsys)
        assert rc == 0, err[-2000:]
        assert f"execution {e}" in out
        m = re.search(r"Tokens/s -> policy: (\d+\.\d), dense: (\d+\.\d)", out)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0
        res[e] = out.split("Prompt:")[1].split("Tokens/s")[0]
    assert res["gathered"] == res["simulated"]  # same continuations, usage and log-probs (to 4 decimals)
    rc, _, err = _main("gen_policy_vs_dense", base + ["--execution", "fast"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--execution" in lines[0]


def test_eval_downstream_execution_flag(tiny_ckpt_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import json

    blocks = {}
    for e in ("simulated", "gathered"):
        path = tmp_path / f"{e}.json"
        rc, out, err = _main("eval_downstream", ["--ckpt_dir", str(tiny_ckpt_dir), "--tasks", "tiny_mc_local",
                                                 "--limit", "2", "--episode_len", "4", "--tgt_keep", "0.25",
                                                 "--execution", e, "--export_sparsity_json", str(path),
                                                 "--no_progress"], capsys)
        assert rc == 0, err[-2000:]
        assert f"execution {e}" in out
        blocks[e] = json.loads(path.read_text())["policy"]
    sim, gat = blocks["simulated"], blocks["gathered"]
    for k in ("accuracy", "token_keep_avg", "prune_keep_avg", "quant_ratio_avg", "n_steps", "action_hist",
              "channel_keep_realised"):
        assert gat[k] == sim[k], k
    assert gat["attn_keep_realised"] == pytest.approx(sim["attn_keep_realised"], abs=1e-6)
    rc, _, err = _main("eval_downstream", ["--ckpt_dir", str(tiny_ckpt_dir), "--execution", "x"], capsys)
    assert rc == 2 and err.strip().startswith("error:") and "--execution" in err


def test_gathered_policy_layout_keeps_the_policy(tiny_ckpt_dir):
    """Loaded for the gathered execution, every Linear layer of the policy reads an input-major weight (a transposed
    view, `checkpoint._layout_policy`) through `dense_gemv`; every parameter keeps its value, and a policy step
    gives the simulated load's logits at batch 1 (the native loop) and batch 3 (the matmul)."""
    from torch import nn

    from utils.checkpoint import load_policy_eval
    from utils.records import StepScalars
    pols = {e: load_policy_eval(str(tiny_ckpt_dir), execution=e)[2] for e in ("simulated", "gathered")}
    sim, gat = (dict(pols[e].named_parameters()) for e in ("simulated", "gathered"))
    assert sim.keys() == gat.keys() and all(torch.equal(sim[k], gat[k]) for k in sim)
    linears = [m for m in pols["gathered"].modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 8 and all(m.weight.t().is_contiguous() and m.weight.t() is not m.weight for m in linears)
    assert all(m._sol_w.data_ptr() == m.weight.data_ptr() for m in linears)  # one copy of the weights
    p = pols["simulated"]
    g = torch.Generator().manual_seed(3)
    for B in (1, 3):
        h, e = torch.randn(B, p.h_dim, generator=g), torch.randn(B, p.e_dim, generator=g)
        scalars = torch.rand(B, StepScalars.DIM, generator=g)
        out = {}
        for name, pol in pols.items():
            state, logits = pol.init_state(B), []
            with torch.inference_mode():
                for _ in range(3):
                    lg, state = pol.step(h, e, scalars, state)
                    state = state.with_action(lg.argmax(-1))
                    logits.append(lg)
            out[name] = torch.stack(logits)
        torch.testing.assert_close(out["gathered"], out["simulated"], atol=1e-5, rtol=1e-5)


def test_gemv_linear_vs_float64():
    """`gemv_linear` leaves a Linear's outputs as they were (float64 reference) for one row, a [1, 1, in] token
    and several rows, with and without bias, narrowing and widening."""
    from torch import nn
    g = torch.Generator().manual_seed(4)
    for n_in, n_out, bias in ((16, 40, True), (40, 3, False), (7, 7, True)):
        lin = nn.Linear(n_in, n_out, bias=bias)
        ref = copy.deepcopy(lin).double()
        gathered.gemv_linear(lin)
        for shape in ((1, n_in), (1, 1, n_in), (5, n_in)):
            x = torch.randn(*shape, generator=g)
            with torch.no_grad():
                torch.testing.assert_close(lin(x).double(), ref(x.double()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("Ts", [0, 1, 4])
def test_recency_two_spans_vs_joined_and_float64(Ts, monkeypatch):
    """Recency attention over [0, Ts) and [lo, K) as two spans merged by their log-sum-exps equals the joined
    keys' SDPA and a float64 softmax over the kept positions (GQA, 2 rows)."""
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, K, D, lo = 2, 6, 2, 40, 8, 25
    q, k, v = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, K, D, generator=g), torch.randn(B, Hkv, K, D, generator=g)
    two = gathered.recency_attention(q, k, v, 0.3, Ts, lo)
    monkeypatch.setattr(gathered, "_FLASH_CPU", None)
    joined = gathered.recency_attention(q, k, v, 0.3, Ts, lo)
    pos = torch.cat([torch.arange(Ts), torch.arange(lo, K)])
    kk, vv = k.double().repeat_interleave(Hq // Hkv, 1)[:, :, pos], v.double().repeat_interleave(Hq // Hkv, 1)[:, :, pos]
    ref = torch.softmax((q.double() @ kk.transpose(-1, -2)) * 0.3, -1) @ vv  # [B, Hq, 1, D]
    assert two.shape == joined.shape == (B, 1, Hq, D)
    torch.testing.assert_close(two, joined, atol=1e-6, rtol=0)
    torch.testing.assert_close(two.double(), ref.transpose(1, 2), atol=1e-6, rtol=0)


# ==== the one-call native decode step (utils/csrc/decode_step.cpp) ======================================

def _native_spy(monkeypatch) -> list[bool]:
    """Records, for each gathered decode step, whether the native step ran it."""
    from utils import fast_decode
    took: list[bool] = []
    real = fast_decode._native_step
    monkeypatch.setattr(fast_decode, "_native_step", lambda *a: (lambda h: took.append(h is not None) or h)(real(*a)))
    return took


@pytest.mark.parametrize("crit", [CRIT[0], CRIT[1], CRIT[3], CRIT[4], CRIT[5]],
                         ids=["recency", "relevancy", "quest", "quest-sinkwin", "quest-kvhead"])
def test_native_step_matches_the_per_layer_path(tiny, crit, monkeypatch):
    """Batch-1 float32 gathered steps run the native step exactly where it applies (dense steps, recency and QUEST
    at any κ, every criterion at κ = 1; any bit-width) and give the per-layer
    path's logits and usage, the cache bytes read included; elsewhere the per-layer path runs."""
    from utils import fast_decode, native
    if native.gather_kernel() is None:
        pytest.skip("no C++ toolchain: the native kernel cannot be built")
    _, _, ids = tiny
    lm = pair(tiny, crit)["gathered"]
    took = _native_spy(monkeypatch)
    A = SPACE.index
    sparse_native = crit[0] in ("recency", "quest")
    for a, native_expected in ((None, True), (A(0.25, 0.4, 16), sparse_native), (A(1.0, 0.4, 16), True),
                               (A(0.5, 1.0, 16), sparse_native), (A(1.0, 0.6, 8), True), (A(0.25, 0.4, 4), sparse_native)):
        acts = None if a is None else torch.tensor([a])
        took.clear()
        fast, read = run(lm, ids[:1], acts), lm.controls.kv_read_sum
        assert took == [native_expected] * STEPS, (a, took)
        monkeypatch.setattr(fast_decode, "NATIVE_STEP", False)
        per_layer = run(lm, ids[:1], acts)
        monkeypatch.setattr(fast_decode, "NATIVE_STEP", True)
        torch.testing.assert_close(fast[0], per_layer[0], atol=1e-5, rtol=0)
        for u, v in zip(fast[1], per_layer[1]):
            assert torch.equal(u.channel_keep, v.channel_keep) and u.effective == v.effective
            torch.testing.assert_close(u.attn_keep, v.attn_keep, atol=1e-6, rtol=0)
        if native_expected and a is not None and (crit[0] == "recency" or a in (A(0.25, 0.4, 16), A(0.5, 1.0, 16),
                                                                              A(0.25, 0.4, 4))):
            assert read == pytest.approx(lm.controls.kv_read_sum, abs=1e-9)  # the last step's, both paths


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("crit", [CRIT[0], CRIT[3], CRIT[4], CRIT[5]],
                         ids=["recency", "quest", "quest-sinkwin", "quest-kvhead"])
def test_native_step_long_decode_matches_simulated(tiny, crit, threads, monkeypatch):
    """κ 0.25 with s40 over more keys than one attention chunk, across page boundaries and the cache's
    reallocation, at 1 and 3 threads (the attention's chunks change with them): the simulated logits, and the same
    cache contents (QUEST: the page bounds the native step folded each new key into, too)."""
    from utils import native
    from utils.kv_cache import SPARE_TOKENS
    if native.gather_kernel() is None:
        pytest.skip("no C++ toolchain: the native kernel cannot be built")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 2000, (1, 12 + SPARE_TOKENS + 70), generator=g)
    acts = torch.tensor([SPACE.index(0.25, 0.4, 16)])
    took = _native_spy(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, caches = {}, {}
        for e, lm in pair(tiny, crit).items():
            cache, _, _ = lm.prefill(ids[:, :12])
            out[e] = torch.stack([lm.step(cache, ids[:, t], acts).logits for t in range(12, ids.shape[1])])
            caches[e] = cache
    finally:
        torch.set_num_threads(before)
    assert all(took) and len(took) == ids.shape[1] - 12
    torch.testing.assert_close(out["gathered"], out["simulated"], atol=ATOL, rtol=0)
    for a, b in zip(caches["gathered"].layers, caches["simulated"].layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        if crit[0] == "quest":  # the page bounds kept step by step against a recount from the keys
            fresh = quest_page_bounds(a.keys, PAGE)
            buf = a._page_buf[:, :, : -(-a.keys.shape[2] // PAGE)]
            D = a.keys.shape[-1]
            torch.testing.assert_close(buf[..., :D], fresh[0], atol=0, rtol=0)
            torch.testing.assert_close(buf[..., D:], fresh[1], atol=0, rtol=0)


def test_native_fast_exp_vs_float64():
    """The native step's vectorisable exp (softmax and SiLU, `fast_exp` in decode_step.cpp) against float64 exp over
    float32's whole non-overflowing range: relative error below 2.5e-7; clamped to exp(-87) and exp(88) outside."""
    from utils import native
    kernel = native.gather_kernel()
    if kernel is None:
        pytest.skip("native kernel not built")
    x = torch.linspace(-87.0, 88.0, 1_000_001)
    rel = ((kernel.fast_exp(x).double() - x.double().exp()) / x.double().exp()).abs()
    assert rel.max().item() < 2.5e-7
    ends = kernel.fast_exp(torch.tensor([-1e4, -87.0, 88.0, 1e4]))
    assert ends[0] == ends[1] and ends[2] == ends[3] and torch.isfinite(ends).all()


def test_native_gemm_rows_vs_float64():
    """`gemm_rows` (a few rows against an input-major weight, each weight row read once) against a float64 product,
    for 2 to 8 rows, widths that leave partial row groups and column blocks, and through `dense_gemv` with a bias."""
    from utils import native
    kernel = native.gather_kernel()
    if kernel is None:
        pytest.skip("native kernel not built")
    g = torch.Generator().manual_seed(5)
    for B, D, N in ((2, 7, 13), (3, 64, 600), (5, 129, 1031), (8, 576, 40)):
        x, w = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g)
        torch.testing.assert_close(kernel.gemm_rows(x, w).double(), x.double() @ w.double(), atol=1e-4, rtol=1e-5)
        b = torch.randn(N, generator=g)
        out = gathered.dense_gemv(x[:, None], w, b)
        assert out.shape == (B, 1, N)
        torch.testing.assert_close(out[:, 0].double(), x.double() @ w.double() + b.double(), atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="gemm_rows"):
        kernel.gemm_rows(torch.randn(9, 4), torch.randn(4, 3))


def test_union_gate_up_vs_masked_product():
    """`union_gate_up` (one native pass over the union of the rows' kept channels) gives the masked dense product of
    2 to 8 rows with different kept channels (float64 reference), and declines one row or more than 8."""
    from utils import native
    if native.gather_kernel() is None:
        pytest.skip("native kernel not built")
    g = torch.Generator().manual_seed(6)
    for B, D, N in ((2, 40, 70), (5, 64, 600), (8, 33, 17)):
        x, w, b = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
        keep = torch.rand(B, D, generator=g) < 0.3
        ref = (x * keep).double() @ w.double() + b.double()
        torch.testing.assert_close(gathered.union_gate_up(x, keep, w, b).double(), ref, atol=1e-4, rtol=1e-5)
    assert gathered.union_gate_up(torch.randn(1, 4), torch.ones(1, 4, dtype=torch.bool), torch.randn(4, 3)) is None
    assert gathered.union_gate_up(torch.randn(9, 4), torch.ones(9, 4, dtype=torch.bool), torch.randn(4, 3)) is None
