// The gathered execution's batch-1 float32 decode step, every layer in one native call (utils/fast_decode.py).
//
// At batch 1 a SmolLM2 step reads ~0.5 GB of weights, and the products that read them take about two thirds of
// the step when each runs as its own op; the rest is a few hundred small ops (norms, rotary, cache append,
// attention, residuals), each costing a dispatch and a pass over a few kB (results/bench_gathered/step_parts.py).
// Those costs are the same for a dense and a pruned step, so they dilute what skipping work buys. Here a layer is
// plain loops around the same streaming product as the separate ops (`gather` in gather_gemv.cpp):
//   RMSNorm -> q/k/v (one input-major product) -> rotary on q and k -> append k, v to the cache buffers ->
//   attention over the kept keys (every key, or recency's sinks + recent span) -> o -> residual ->
//   RMSNorm -> gate+up (every input channel, or those with |x| >= the kth smallest: the simulated mode's choice)
//   -> SiLU(gate) * up -> down -> residual,
// and the final RMSNorm after the last layer. Same math as LlamaDecoderLayer (Hugging Face transformers) and the
// controls of utils/controls.py; the results agree to float rounding (tests/test_gathered.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

// gather_gemv.cpp: op[c] = sum_j xp[ip[j]] * wp[ip[j] * N + c] over n rows of an input-major w.
void gather(const float* xp, const int64_t* ip, int64_t n, const float* wp, int64_t N, float* op);

namespace {

// LlamaRMSNorm in float32: y = x / sqrt(mean(x^2) + eps) * w.
void rms_norm(const float* x, const float* w, int64_t H, float eps, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * r);
}

// x <- x * cos + rotate_half(x) * sin for one head of D (rotate_half: [-x2, x1]).
void rotate(float* x, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

// exp(x) in float32, written so that a loop of it vectorises (std::exp does not, without fast-math): x clamped to
// [-87, 88] (float32 exp underflows below, overflows above), x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its
// degree-6 Taylor polynomial, 2^n put into the exponent bits. Relative error below 2.5e-7 over [-87, 88] against
// float64 exp (tests/test_gathered.py `test_native_fast_exp_vs_float64`).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as a float's bits
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

// Softmax attention over kept positions. Selection s (a KV head's query group, or one query head) covers the g
// query heads from s * g on and attends the positions pos[s] of KV head kv[s]. Each selection's positions are split
// into chunks over the threads; a chunk keeps its own running max, sum and weighted values, merged at the end
// (the split-K form of FlashAttention's online softmax).
void attend(const float* q, const float* kb, const float* vb, const std::vector<int64_t>& kv,
            const std::vector<std::vector<int32_t>>& pos, int64_t g, int64_t D, int64_t cap, float scale,
            float* out) {
  const int64_t n_sel = static_cast<int64_t>(pos.size());
  int64_t longest = 1;
  for (const auto& p : pos) longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  const int64_t T = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * T + n_sel - 1) / n_sel, (longest + 63) / 64));
  const int64_t tasks = n_sel * chunks;
  std::vector<float> mx(tasks * g), sm(tasks * g), acc(tasks * g * D);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sel = t / chunks, n = static_cast<int64_t>(pos[sel].size());
      const int64_t len = (n + chunks - 1) / chunks, i0 = std::min(n, (t % chunks) * len), i1 = std::min(n, i0 + len);
      const int32_t* P = pos[sel].data();
      const float* K = kb + kv[sel] * cap * D;
      const float* V = vb + kv[sel] * cap * D;
      const float* Q = q + sel * g * D;
      float* m = mx.data() + t * g;
      float* s = sm.data() + t * g;
      float* a = acc.data() + t * g * D;
      std::fill(m, m + g, -std::numeric_limits<float>::infinity());
      std::fill(s, s + g, 0.f);
      std::fill(a, a + g * D, 0.f);
      const int64_t n_i = i1 - i0;
      sc.resize(static_cast<size_t>(n_i * g));  // head j's scores at sc[j * n_i ...]
      for (int64_t i = 0; i < n_i; ++i) {
        const float* k = K + static_cast<int64_t>(P[i0 + i]) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float* qj = Q + j * D;
          float d = 0.f;
#pragma omp simd reduction(+ : d)
          for (int64_t e = 0; e < D; ++e) d += qj[e] * k[e];
          sc[j * n_i + i] = d * scale;
        }
      }
      for (int64_t j = 0; j < g; ++j) {  // the exponentials in one vectorisable pass per head
        float* r = sc.data() + j * n_i;
        float mj = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n_i; ++i) mj = std::max(mj, r[i]);
        float sj = 0.f;
#pragma omp simd reduction(+ : sj)
        for (int64_t i = 0; i < n_i; ++i) {
          r[i] = fast_exp(r[i] - mj);
          sj += r[i];
        }
        m[j] = mj;
        s[j] = sj;
      }
      for (int64_t i = 0; i < n_i; ++i) {
        const float* v = V + static_cast<int64_t>(P[i0 + i]) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float p = sc[j * n_i + i];
          float* aj = a + j * D;
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) aj[e] += p * v[e];
        }
      }
    }
  });
  for (int64_t sel = 0; sel < n_sel; ++sel) {
    for (int64_t j = 0; j < g; ++j) {
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) M = std::max(M, mx[(sel * chunks + c) * g + j]);
      float total = 0.f;
      float* o = out + (sel * g + j) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = sel * chunks + c;
        if (sm[t * g + j] == 0.f) continue;  // an empty chunk
        const float f = std::exp(mx[t * g + j] - M);
        total += f * sm[t * g + j];
        const float* a = acc.data() + (t * g + j) * D;
        for (int64_t e = 0; e < D; ++e) o[e] += f * a[e];
      }
      for (int64_t e = 0; e < D; ++e) o[e] /= total;
    }
  }
}

// QUEST (Tang et al. 2024) for one layer, as utils/attention.py `quest_select_pages`: fold the new key (position
// L) into its page's elementwise max | min (bounds [Hkv, capP, 2D], kept up to date for positions < L), score
// every page of every selection by its upper bound sum_d max(q_d max_d, q_d min_d) = [q+, q-] . [max, min] (with a
// group selection, the mean of its query heads' [q+, q-]), keep each selection's pages scoring at least its
// n_keep-th largest (ties kept) and list their positions, with the first `sinks` and the last `recent` positions
// kept in every selection too (quest_keep_sink_window; 0 and 0 without it). Returns the tokens read per KV head (the largest union
// of its selections' pages, whole pages, at most K) and adds the kept tokens summed over query heads to *kept.
int64_t quest_positions(const float* q, const float* knew, float* bounds, int64_t cap_p, int64_t Hkv, int64_t g,
                        bool per_kv_head, int64_t D, int64_t L, int64_t page, int64_t n_keep, int64_t sinks,
                        int64_t recent, std::vector<std::vector<int32_t>>& pos, int64_t* kept) {
  const int64_t K = L + 1, P = (K + page - 1) / page, pl = L / page;
  for (int64_t hk = 0; hk < Hkv; ++hk) {
    const float* k = knew + hk * D;
    float* b = bounds + (hk * cap_p + pl) * 2 * D;
    for (int64_t e = 0; e < D; ++e) {
      b[e] = L % page ? std::max(b[e], k[e]) : k[e];
      b[D + e] = L % page ? std::min(b[D + e], k[e]) : k[e];
    }
  }
  const int64_t gs = per_kv_head ? g : 1;  // query heads per selection
  const int64_t n_sel = Hkv * g / gs;
  pos.assign(n_sel, {});
  std::vector<float> qq(2 * D), score(P), tmp(P);
  std::vector<char> any(P);
  int64_t read = 0;
  for (int64_t hk = 0; hk < Hkv; ++hk) {
    std::fill(any.begin(), any.end(), 0);
    for (int64_t j = 0; j < g / gs; ++j) {
      const int64_t sel = hk * (g / gs) + j;
      std::fill(qq.begin(), qq.end(), 0.f);
      for (int64_t h = sel * gs; h < (sel + 1) * gs; ++h)
        for (int64_t e = 0; e < D; ++e) {
          qq[e] += std::max(q[h * D + e], 0.f);
          qq[D + e] += std::min(q[h * D + e], 0.f);
        }
      if (gs > 1)
        for (auto& v : qq) v /= static_cast<float>(gs);
      const float* b = bounds + hk * cap_p * 2 * D;
      for (int64_t p = 0; p < P; ++p) {
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t e = 0; e < 2 * D; ++e) d += qq[e] * b[p * 2 * D + e];
        score[p] = d;
      }
      float thr = -std::numeric_limits<float>::infinity();
      if (n_keep < P) {
        tmp = score;
        std::nth_element(tmp.begin(), tmp.begin() + (n_keep - 1), tmp.end(), std::greater<float>());
        thr = tmp[n_keep - 1];
      }
      for (int64_t p = 0; p < P; ++p) {
        const bool whole = score[p] >= thr;
        for (int64_t t = p * page; t < std::min(K, (p + 1) * page); ++t) {
          if (!whole && t >= sinks && t < K - recent) continue;
          pos[sel].push_back(static_cast<int32_t>(t));
          any[p] = 1;
        }
      }
      *kept += static_cast<int64_t>(pos[sel].size()) * gs;
    }
    int64_t m = 0;
    for (int64_t p = 0; p < P; ++p) m += any[p];
    read = std::max(read, std::min(m * page, K));
  }
  return read;
}

// The kept input channels of one MLP input: every i with |x_i| >= the kth smallest |x| (ties kept), ascending.
int64_t select_channels(const float* x, int64_t H, int64_t kth, std::vector<float>& tmp, std::vector<int64_t>& idx) {
  for (int64_t i = 0; i < H; ++i) tmp[i] = std::fabs(x[i]);
  std::nth_element(tmp.begin(), tmp.begin() + (kth - 1), tmp.begin() + H);
  const float thr = tmp[kth - 1];
  int64_t n = 0;
  for (int64_t i = 0; i < H; ++i)
    if (std::fabs(x[i]) >= thr) idx[n++] = i;
  return n;
}

// utils/mlp_controls.py `fake_quantize` of one token: symmetric absmax, qmax = 2^(bits-1) - 1 (at least 1), round
// half to even (the default rounding mode), clamp to +-qmax, all in float32.
void fake_quantize(float* y, int64_t H, int64_t bits) {
  const float qmax = std::max(std::pow(2.f, static_cast<float>(bits) - 1.f) - 1.f, 1.f);
  float amax = 0.f;
  for (int64_t i = 0; i < H; ++i) amax = std::max(amax, std::fabs(y[i]));
  const float scale = std::max(amax, 1e-8f) / qmax;
  for (int64_t i = 0; i < H; ++i) y[i] = std::min(std::max(std::nearbyint(y[i] / scale), -qmax), qmax) * scale;
}

const float* f32(const torch::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel, "decode_layers: ", what);
  return t.data_ptr<float>();
}

}  // namespace

// One decode token through every layer. h [H] receives the final-norm hidden state of token `token` (an int64 tensor of
// one element), whose input embedding is row token of `emb` [V, H] (any strides: a tied embedding laid out input-major
// for the LM head is a transposed view, and its row is read here with prefetch rather than by an ATen op that pays each
// strided element's cache miss in turn). weights: six tensors per layer (input norm [H], q/k/v input-major [H, (Hq + 2
// Hkv) D], o input-major [Hq D, H], post-attention norm [H], gate+up input-major [H, 2I], down input-major [I, H]);
// caches: two per layer (key and value buffers [1, Hkv, cap, D]; the new token is written at position L, so cap > L).
// cos/sin [n > L, D]: the rotary embedding of positions 0 .. n-1 (row L is used). kth: 0 keeps every MLP input channel,
// else those with |x| at or above the kth smallest. Attention: with quest_page > 0, QUEST over the pages
// (`quest_positions`; page bounds [1, Hkv, capP, 2D] per layer in `pages`, n_keep pages per selection, one selection
// per KV head or per query head, the first quest_sinks and last quest_recent positions always kept); else positions [0,
// Ts) and [lo, L] when lo > Ts, every one otherwise. qbits in [1, 16): the MLP output fake-quantized to that many bits
// (`fake_quantize`), else left as it is. record (optional, [layers, H]): each layer's MLP input, for tests. Returns
// (kept MLP channels, kept keys summed over query heads, tokens read per KV head), each summed over the layers.
std::tuple<int64_t, int64_t, int64_t> decode_layers(
    torch::Tensor h, const torch::Tensor& emb, const torch::Tensor& token, const std::vector<torch::Tensor>& weights,
    const std::vector<torch::Tensor>& caches, const torch::Tensor& final_norm, const torch::Tensor& cos,
    const torch::Tensor& sin, int64_t L, int64_t n_heads,
    int64_t n_kv_heads, double eps, double scaling, int64_t kth, int64_t Ts, int64_t lo, int64_t quest_page,
    int64_t quest_keep, bool quest_per_kv_head, int64_t quest_sinks, int64_t quest_recent,
    const std::vector<torch::Tensor>& pages, int64_t qbits,
    c10::optional<torch::Tensor> record) {
  const int64_t n_layers = static_cast<int64_t>(weights.size()) / 6;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * n_layers && caches.size() == 2 * weights.size() / 6,
              "decode_layers: six weights and two caches per layer");
  TORCH_CHECK(n_layers > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "decode_layers: heads");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) > L, "decode_layers: rotary tables");
  const int64_t H = h.numel(), D = cos.size(1), g = n_heads / n_kv_heads;
  const int64_t Nq = n_heads * D, Nkv = n_kv_heads * D, I = weights[4].size(1) / 2, K = L + 1;
  TORCH_CHECK(kth >= 0 && kth <= H, "decode_layers: kth out of range");
  float* x = const_cast<float*>(f32(h, H, "hidden"));
  const float* cp = f32(cos, cos.numel(), "cos") + L * D;
  const float* sp = f32(sin, sin.numel(), "sin") + L * D;
  TORCH_CHECK(token.dtype() == torch::kInt64 && token.numel() == 1, "decode_layers: token");
  TORCH_CHECK(emb.dtype() == torch::kFloat32 && emb.dim() == 2 && emb.size(1) == H, "decode_layers: embedding");
  const int64_t tok = *token.data_ptr<int64_t>();
  TORCH_CHECK(tok >= 0 && tok < emb.size(0), "decode_layers: token out of range");
  {
    const float* e = emb.data_ptr<float>() + tok * emb.stride(0);
    const int64_t st = emb.stride(1);
    for (int64_t i = 0; i < H; ++i) {
      if (i + 16 < H) __builtin_prefetch(e + (i + 16) * st, 0, 0);
      x[i] = e[i * st];
    }
  }
  float* rec = nullptr;
  if (record.has_value()) rec = const_cast<float*>(f32(*record, n_layers * H, "record"));
  TORCH_CHECK(quest_page == 0 || (static_cast<int64_t>(pages.size()) == n_layers && quest_keep >= 1),
              "decode_layers: QUEST needs one page-bound buffer per layer and n_keep >= 1");
  // dense and recency: the same positions for every KV head and layer
  std::vector<std::vector<int32_t>> pos(n_kv_heads);
  std::vector<int64_t> kv(n_kv_heads);
  if (quest_page == 0) {
    const bool two_spans = lo > Ts && lo < K;
    for (int64_t i = 0; i < K; ++i)
      if (!two_spans || i < Ts || i >= lo) pos[0].push_back(static_cast<int32_t>(i));
    for (int64_t hk = 0; hk < n_kv_heads; ++hk) {
      pos[hk] = pos[0];
      kv[hk] = hk;
    }
  } else {
    kv.resize(quest_per_kv_head ? n_kv_heads : n_heads);
    for (size_t s = 0; s < kv.size(); ++s) kv[s] = quest_per_kv_head ? s : s / g;
  }

  std::vector<float> xn(H), qkv(Nq + 2 * Nkv), att(Nq), o(H), gu(2 * I), act(I), tmp(H);
  std::vector<int64_t> all(std::max(H, std::max(Nq, I))), idx(H);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  int64_t kept = 0, kept_keys = 0, read = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const torch::Tensor* w = weights.data() + 6 * l;
    const float* wqkv = f32(w[1], H * (Nq + 2 * Nkv), "q/k/v weight");
    const float* wo = f32(w[2], Nq * H, "o weight");
    const float* win = f32(w[4], H * 2 * I, "gate/up weight");
    const float* wdown = f32(w[5], I * H, "down weight");
    const torch::Tensor& kbuf = caches[2 * l];
    const torch::Tensor& vbuf = caches[2 * l + 1];
    TORCH_CHECK(kbuf.dim() == 4 && kbuf.size(0) == 1 && kbuf.size(1) == n_kv_heads && kbuf.size(3) == D &&
                    kbuf.size(2) > L && kbuf.sizes() == vbuf.sizes(),
                "decode_layers: cache buffers");
    const int64_t cap = kbuf.size(2);
    float* kb = const_cast<float*>(f32(kbuf, n_kv_heads * cap * D, "key buffer"));
    float* vb = const_cast<float*>(f32(vbuf, n_kv_heads * cap * D, "value buffer"));

    rms_norm(x, f32(w[0], H, "input norm"), H, static_cast<float>(eps), xn.data());
    gather(xn.data(), all.data(), H, wqkv, Nq + 2 * Nkv, qkv.data());
    for (int64_t hh = 0; hh < n_heads + n_kv_heads; ++hh) rotate(qkv.data() + hh * D, cp, sp, D);
    for (int64_t hk = 0; hk < n_kv_heads; ++hk) {
      std::copy_n(qkv.data() + Nq + hk * D, D, kb + (hk * cap + L) * D);
      std::copy_n(qkv.data() + Nq + Nkv + hk * D, D, vb + (hk * cap + L) * D);
    }
    if (quest_page > 0) {
      const torch::Tensor& pb = pages[l];
      TORCH_CHECK(pb.dim() == 4 && pb.size(0) == 1 && pb.size(1) == n_kv_heads && pb.size(3) == 2 * D &&
                      pb.size(2) * quest_page > L,
                  "decode_layers: page bounds");
      read += quest_positions(qkv.data(), qkv.data() + Nq, const_cast<float*>(f32(pb, pb.numel(), "page bounds")),
                              pb.size(2), n_kv_heads, g, quest_per_kv_head, D, L, quest_page, quest_keep,
                              quest_sinks, quest_recent, pos, &kept_keys);
    }
    attend(qkv.data(), kb, vb, kv, pos, quest_page > 0 && !quest_per_kv_head ? 1 : g, D, cap,
           static_cast<float>(scaling), att.data());
    gather(att.data(), all.data(), Nq, wo, H, o.data());
    for (int64_t i = 0; i < H; ++i) x[i] += o[i];

    rms_norm(x, f32(w[3], H, "post-attention norm"), H, static_cast<float>(eps), xn.data());
    if (rec != nullptr) std::copy_n(xn.data(), H, rec + l * H);
    if (kth == 0) {
      gather(xn.data(), all.data(), H, win, 2 * I, gu.data());
      kept += H;
    } else {
      const int64_t m = select_channels(xn.data(), H, kth, tmp, idx);
      gather(xn.data(), idx.data(), m, win, 2 * I, gu.data());
      kept += m;
    }
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const float a = gu[i];
      act[i] = a / (1.f + fast_exp(-a)) * gu[I + i];
    }
    gather(act.data(), all.data(), I, wdown, H, o.data());
    if (qbits >= 1 && qbits < 16) fake_quantize(o.data(), H, qbits);
    for (int64_t i = 0; i < H; ++i) x[i] += o[i];
  }
  rms_norm(x, f32(final_norm, H, "final norm"), H, static_cast<float>(eps), xn.data());
  std::copy(xn.begin(), xn.end(), x);
  return {kept, kept_keys, read};
}

// `fast_exp` of every element of a float32 tensor (tests: its error against float64 exp).
torch::Tensor fast_exp_tensor(const torch::Tensor& x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "fast_exp: a contiguous float32 tensor");
  auto y = torch::empty_like(x);
  const float* a = x.data_ptr<float>();
  float* o = y.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = fast_exp(a[i]);
  return y;
}

void bind_decode_step(pybind11::module_& m) {
  m.def("decode_layers", &decode_layers,
        "one batch-1 float32 decode token through every Llama layer and the final norm (h in place)");
  m.def("fast_exp", &fast_exp_tensor, "the native step's vectorisable float32 exp, elementwise (for tests)");
}
