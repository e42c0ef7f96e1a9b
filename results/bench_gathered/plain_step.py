"""How fast is a hand-written batch-1 decode step of SmolLM2 in plain PyTorch ops (no Hugging Face modules, no
controls, a bare preallocated cache with random contents)? Dense and s40 (the native select + gather) on every step,
256 steps after a 256-token position, median of 3 rounds. The reference point for utils/fast_decode.py in
docs/usage.md ("What limits end to end at batch 1"): 29.5 ms per dense step and 1.21x for s40 in that session.
With --native every product (q/k/v, o, gate+up, down, LM head) reads an input-major weight through the native
every-row loop (`gathered.dense_gemv`), as the gathered execution's decode step does since part J: the lean loop's
ratio with dense and pruned products on the same kernel. Run alone: python results/bench_gathered/plain_step.py [--native]"""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from utils.model import load_lm, SMOLLM2_ALIAS
from utils import native
torch.manual_seed(0)
base, tok = load_lm(SMOLLM2_ALIAS, "float32")
c = base.config
H, nH, nKV, hd, I, L = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.intermediate_size, c.num_hidden_layers
eps = c.rms_norm_eps
theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
k = native.gather_kernel()
NATIVE = "--native" in sys.argv
im = (lambda w: w.t().contiguous()) if NATIVE else (lambda w: w)  # input-major for the native loop
mv = (lambda w, x: k.gemv(x, w)) if NATIVE else torch.mv
layers = []
for ly in base.model.layers:
    a, m = ly.self_attn, ly.mlp
    layers.append(dict(
        n1=ly.input_layernorm.weight, n2=ly.post_attention_layernorm.weight,
        qkv=im(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()),
        o=im(a.o_proj.weight), win=torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
        down=im(m.down_proj.weight)))
nf, lm_head, emb = base.model.norm.weight, im(base.lm_head.weight), base.model.embed_tokens.weight
P, T = 256, 256
caches = [(torch.randn(1, nKV, P + T + 1, hd), torch.randn(1, nKV, P + T + 1, hd)) for _ in range(L)]

def rot(x, cos, sin):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin

@torch.inference_mode()
def run(kth):
    t = torch.tensor(5)
    for s in range(T):
        pos = P + s
        f = pos * inv
        emb2 = torch.cat((f, f))
        cos, sin = emb2.cos(), emb2.sin()
        h = emb[t]
        for ly, (K, V) in zip(layers, caches):
            a = F.rms_norm(h, (H,), ly["n1"], eps)
            qkv = mv(ly["qkv"], a)
            q = rot(qkv[: nH * hd].view(nH, hd), cos, sin)
            kk = rot(qkv[nH * hd: (nH + nKV) * hd].view(nKV, hd), cos, sin)
            K[0, :, pos] = kk
            V[0, :, pos] = qkv[(nH + nKV) * hd:].view(nKV, hd)
            o = F.scaled_dot_product_attention(q[None, :, None], K[:, :, : pos + 1], V[:, :, : pos + 1], enable_gqa=True)
            h = h + mv(ly["o"], o.view(-1))
            a = F.rms_norm(h, (H,), ly["n2"], eps)
            gu = (k.gemv(a, ly["win"]) if NATIVE else a @ ly["win"]) if kth is None else k.select_gather_gemv(a, kth, ly["win"])[0]
            g, u = gu.split(I)
            h = h + mv(ly["down"], F.silu(g) * u)
        logits = mv(lm_head, F.rms_norm(h, (H,), nf, eps))
        t = logits.argmax()

kth = H - int(round(0.4 * H)) + 1
run(None); run(kth)
td, ts = [], []
for r in range(3):
    t0 = time.perf_counter(); run(None); td.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); run(kth); ts.append(time.perf_counter() - t0)
print(f"{'native products: ' if NATIVE else ''}lean dense {1e3*statistics.median(td)/T:.1f} ms/step ({T/statistics.median(td):.1f} tok/s), "
      f"s40 {1e3*statistics.median(ts)/T:.1f} ms/step, ratio {statistics.median(d/s for d, s in zip(td, ts)):.2f}")
