// The SOL policy's batch-1 float32 decode step in one native call (utils/fast_policy.py), for the gathered execution.
//
// In generation the policy runs between two LM steps, whose ~0.5 GB weight stream has evicted everything it touches:
// as ~40 ATen ops its step cost ~1.6 ms against ~0.5 ms for reading its weights (results/bench_gathered, part S; one
// call: results/bench_gathered/policy_parts.py, part U2).
// Here it is plain loops around the same streaming product as the LM's native step (`gather` in gather_gemv.cpp):
//   s = LN(GELU(scalars W_s + b_s)); x = [h, e, s, action_emb[prev]] W_obs + b_obs + pos_emb[pos];
//   per block: x += o(Attn(q, k, v of LN1(x)) over the cached steps and this one); x += W2 GELU(W1 LN2(x) + b1) + b2;
//   out = LN_f(x) W_pi + b_pi (the network's logits before the budget terms, which stay in Python: `SOLPolicy._head`).
// Same math as utils/policy.py (`_encode`, `_Block`, the start of `_head`); tests/test_fast_policy.py checks it.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

// gather_gemv.cpp: op[c] = sum_j xp[ip[j]] * wp[ip[j] * N + c] over n rows of an input-major w.
void gather(const float* xp, const int64_t* ip, int64_t n, const float* wp, int64_t N, float* op);

namespace {

// y = W^T x + b for an input-major W [in, out] (every row; b may be null).
void linear(const float* x, const torch::Tensor& w, const float* b, float* y, const std::vector<int64_t>& all) {
  const int64_t in = w.size(0), out = w.size(1);
  gather(x, all.data(), in, w.data_ptr<float>(), out, y);
  if (b != nullptr)
    for (int64_t i = 0; i < out; ++i) y[i] += b[i];
}

// nn.LayerNorm over n values (biased variance), in place into y.
void layer_norm(const float* x, const float* w, const float* b, int64_t n, float eps, float* y) {
  float mean = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  float var = 0.f;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float r = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

// nn.GELU() (the exact form): x * (1 + erf(x / sqrt 2)) / 2, in place.
void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
}

const float* ptr(const torch::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel, "policy_step: ", what);
  return t.data_ptr<float>();
}

}  // namespace

// One step of one row. h [Dh], e [De], scalars [>= S]; prev: int64 tensor of one element (the previous action, or
// the BOS id); pos: the step's position. w: scalar_proj Linear (input-major [S, 64], bias), its LayerNorm (weight,
// bias), action_emb [A + 1, Da], obs_proj (input-major [Dh + De + 64 + Da, d], bias), pos_emb [max_len, d]; per
// block twelve: ln1 (weight, bias), q, k, v, o (input-major [d, d]), ln2 (weight, bias), ffn first Linear
// (input-major [d, m], bias), second (input-major [m, d], bias); then ln_f (weight, bias) and pi (input-major
// [d, n_out], bias). kbufs/vbufs: per block [n_heads, cap, d / n_heads] with steps 0 .. pos-1 filled; this step's key
// and value are written at pos (cap > pos). Returns pi(ln_f(x)) [n_out].
torch::Tensor policy_step(const torch::Tensor& h, const torch::Tensor& e, const torch::Tensor& scalars,
                          const torch::Tensor& prev, int64_t pos, const std::vector<torch::Tensor>& w,
                          int64_t n_heads, double eps_d, const std::vector<torch::Tensor>& kbufs,
                          const std::vector<torch::Tensor>& vbufs) {
  const int64_t n_blocks = static_cast<int64_t>(kbufs.size());
  TORCH_CHECK(static_cast<int64_t>(w.size()) == 8 + 12 * n_blocks + 4 && vbufs.size() == kbufs.size(),
              "policy_step: 8 + 12 per block + 4 weights, one key and one value buffer per block");
  const float eps = static_cast<float>(eps_d);
  const torch::Tensor &ws = w[0], &we = w[4], &wobs = w[5], &wpos = w[7];
  const int64_t S = ws.size(0), P = ws.size(1), Da = we.size(1), d = wobs.size(1);
  const int64_t Dh = h.numel(), De = e.numel(), Din = Dh + De + P + Da, dh = d / n_heads;
  TORCH_CHECK(wobs.size(0) == Din && d % n_heads == 0 && scalars.numel() >= S, "policy_step: shapes");
  TORCH_CHECK(pos >= 0 && pos < wpos.size(0), "policy_step: position out of range");
  TORCH_CHECK(prev.dtype() == torch::kInt64 && prev.numel() == 1, "policy_step: previous action");
  const int64_t a = *prev.data_ptr<int64_t>();
  TORCH_CHECK(a >= 0 && a < we.size(0), "policy_step: previous action out of range");
  int64_t widest = std::max<int64_t>(Din, d);
  for (int64_t l = 0; l < n_blocks; ++l) widest = std::max<int64_t>(widest, w[8 + 12 * l + 8].size(1));
  std::vector<int64_t> all(static_cast<size_t>(widest));
  std::iota(all.begin(), all.end(), 0);

  // the observation: [h, e, LN(GELU(scalar_proj)), action_emb[prev]] -> obs_proj + pos_emb[pos]
  std::vector<float> obs(Din), sp(P), x(d), xn(d), q(d), k(d), v(d), att(d), o(d);
  std::copy_n(ptr(h, Dh, "h"), Dh, obs.begin());
  std::copy_n(ptr(e, De, "e"), De, obs.begin() + Dh);
  TORCH_CHECK(scalars.dtype() == torch::kFloat32 && scalars.is_contiguous(), "policy_step: scalars");
  linear(scalars.data_ptr<float>(), ws, ptr(w[1], P, "scalar_proj bias"), sp.data(), all);
  gelu(sp.data(), P);
  layer_norm(sp.data(), ptr(w[2], P, "scalar LN weight"), ptr(w[3], P, "scalar LN bias"), P, eps, obs.data() + Dh + De);
  std::copy_n(ptr(we, we.numel(), "action_emb") + a * Da, Da, obs.begin() + Dh + De + P);
  linear(obs.data(), wobs, ptr(w[6], d, "obs_proj bias"), x.data(), all);
  const float* pe = ptr(wpos, wpos.numel(), "pos_emb") + pos * d;
  for (int64_t i = 0; i < d; ++i) x[i] += pe[i];

  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  for (int64_t l = 0; l < n_blocks; ++l) {
    const torch::Tensor* b = w.data() + 8 + 12 * l;
    const int64_t m = b[8].size(1);
    const torch::Tensor &kb = kbufs[l], &vb = vbufs[l];
    TORCH_CHECK(kb.dim() == 3 && kb.size(0) == n_heads && kb.size(2) == dh && kb.size(1) > pos &&
                    kb.sizes() == vb.sizes() && kb.is_contiguous() && vb.is_contiguous() &&
                    kb.dtype() == torch::kFloat32 && vb.dtype() == torch::kFloat32,
                "policy_step: key/value buffers");
    const int64_t cap = kb.size(1);
    float* K = kb.data_ptr<float>();
    float* V = vb.data_ptr<float>();
    layer_norm(x.data(), ptr(b[0], d, "ln1 weight"), ptr(b[1], d, "ln1 bias"), d, eps, xn.data());
    linear(xn.data(), b[2], nullptr, q.data(), all);
    linear(xn.data(), b[3], nullptr, k.data(), all);
    linear(xn.data(), b[4], nullptr, v.data(), all);
    std::vector<float> sc(pos + 1);
    for (int64_t hh = 0; hh < n_heads; ++hh) {
      float* Kh = K + hh * cap * dh;
      float* Vh = V + hh * cap * dh;
      std::copy_n(k.data() + hh * dh, dh, Kh + pos * dh);
      std::copy_n(v.data() + hh * dh, dh, Vh + pos * dh);
      const float* qh = q.data() + hh * dh;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t <= pos; ++t) {
        float s = 0.f;
        for (int64_t c = 0; c < dh; ++c) s += qh[c] * Kh[t * dh + c];
        sc[t] = s * scale;
        mx = std::max(mx, sc[t]);
      }
      float tot = 0.f;
      for (int64_t t = 0; t <= pos; ++t) {
        sc[t] = std::exp(sc[t] - mx);
        tot += sc[t];
      }
      float* out = att.data() + hh * dh;
      std::fill(out, out + dh, 0.f);
      for (int64_t t = 0; t <= pos; ++t)
        for (int64_t c = 0; c < dh; ++c) out[c] += sc[t] * Vh[t * dh + c];
      for (int64_t c = 0; c < dh; ++c) out[c] /= tot;
    }
    linear(att.data(), b[5], nullptr, o.data(), all);
    for (int64_t i = 0; i < d; ++i) x[i] += o[i];
    layer_norm(x.data(), ptr(b[6], d, "ln2 weight"), ptr(b[7], d, "ln2 bias"), d, eps, xn.data());
    std::vector<float> f(m);
    linear(xn.data(), b[8], ptr(b[9], m, "ffn bias"), f.data(), all);
    gelu(f.data(), m);
    linear(f.data(), b[10], ptr(b[11], d, "ffn bias"), o.data(), all);
    for (int64_t i = 0; i < d; ++i) x[i] += o[i];
  }
  const torch::Tensor& wpi = w[w.size() - 2];
  layer_norm(x.data(), ptr(w[w.size() - 4], d, "ln_f weight"), ptr(w[w.size() - 3], d, "ln_f bias"), d, eps, xn.data());
  auto out = torch::empty({wpi.size(1)}, wpi.options());
  linear(xn.data(), wpi, ptr(w.back(), wpi.size(1), "pi bias"), out.data_ptr<float>(), all);
  return out;
}

void bind_policy_step(pybind11::module_& m) {
  m.def("policy_step", &policy_step, "the SOL policy's batch-1 float32 decode step up to pi(ln_f(x))");
}
