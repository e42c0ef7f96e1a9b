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
#include <cmath>
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

// Softmax attention of the g query heads of one KV head over n kept positions (position of kept index i:
// i < n0 ? i : lo + i - n0), split into chunks over the threads; each chunk keeps its own running max, sum and
// weighted values, merged at the end (the split-K form of FlashAttention's online softmax).
void attend(const float* q, const float* kb, const float* vb, int64_t Hkv, int64_t g, int64_t D, int64_t cap,
            int64_t n, int64_t n0, int64_t lo, float scale, float* out) {
  const int64_t T = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * T + Hkv - 1) / Hkv, (n + 63) / 64));
  const int64_t len = (n + chunks - 1) / chunks;
  const int64_t tasks = Hkv * chunks;
  std::vector<float> mx(tasks * g), sm(tasks * g), acc(tasks * g * D);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(static_cast<size_t>(len * g));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t hk = t / chunks, i0 = (t % chunks) * len, i1 = std::min(n, i0 + len);
      const float* K = kb + hk * cap * D;
      const float* V = vb + hk * cap * D;
      const float* Q = q + hk * g * D;
      float* m = mx.data() + t * g;
      float* s = sm.data() + t * g;
      float* a = acc.data() + t * g * D;
      std::fill(m, m + g, -std::numeric_limits<float>::infinity());
      std::fill(s, s + g, 0.f);
      std::fill(a, a + g * D, 0.f);
      for (int64_t i = i0; i < i1; ++i) {
        const float* k = K + (i < n0 ? i : lo + i - n0) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float* qj = Q + j * D;
          float d = 0.f;
#pragma omp simd reduction(+ : d)
          for (int64_t e = 0; e < D; ++e) d += qj[e] * k[e];
          d *= scale;
          sc[(i - i0) * g + j] = d;
          m[j] = std::max(m[j], d);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        const float* v = V + (i < n0 ? i : lo + i - n0) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float p = std::exp(sc[(i - i0) * g + j] - m[j]);
          s[j] += p;
          float* aj = a + j * D;
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) aj[e] += p * v[e];
        }
      }
    }
  });
  for (int64_t hk = 0; hk < Hkv; ++hk) {
    for (int64_t j = 0; j < g; ++j) {
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) M = std::max(M, mx[(hk * chunks + c) * g + j]);
      float total = 0.f;
      float* o = out + (hk * g + j) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = hk * chunks + c;
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

const float* f32(const torch::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel, "decode_layers: ", what);
  return t.data_ptr<float>();
}

}  // namespace

// One decode token through every layer. h [H] (the token's embedding) is updated in place to the final-norm
// hidden state. weights: six tensors per layer (input norm [H], q/k/v input-major [H, (Hq + 2 Hkv) D], o
// input-major [Hq D, H], post-attention norm [H], gate+up input-major [H, 2I], down input-major [I, H]); caches:
// two per layer (key and value buffers [1, Hkv, cap, D]; the new token is written at position L, so cap > L).
// cos/sin [D]: the rotary embedding of position L. kth: 0 keeps every MLP input channel, else those with |x| at
// or above the kth smallest. Attention reads positions [0, Ts) and [lo, L] when lo > Ts, every one otherwise.
// record (optional, [layers, H]): each layer's MLP input, for tests. Returns the kept channels over all layers.
int64_t decode_layers(torch::Tensor h, const std::vector<torch::Tensor>& weights,
                      const std::vector<torch::Tensor>& caches, const torch::Tensor& final_norm,
                      const torch::Tensor& cos, const torch::Tensor& sin, int64_t L, int64_t n_heads,
                      int64_t n_kv_heads, double eps, double scaling, int64_t kth, int64_t Ts, int64_t lo,
                      c10::optional<torch::Tensor> record) {
  const int64_t n_layers = static_cast<int64_t>(weights.size()) / 6;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * n_layers && caches.size() == 2 * weights.size() / 6,
              "decode_layers: six weights and two caches per layer");
  TORCH_CHECK(n_layers > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "decode_layers: heads");
  const int64_t H = h.numel(), D = cos.numel(), g = n_heads / n_kv_heads;
  const int64_t Nq = n_heads * D, Nkv = n_kv_heads * D, I = weights[4].size(1) / 2, K = L + 1;
  TORCH_CHECK(kth >= 0 && kth <= H, "decode_layers: kth out of range");
  float* x = const_cast<float*>(f32(h, H, "hidden"));
  const float* cp = f32(cos, D, "cos");
  const float* sp = f32(sin, D, "sin");
  float* rec = nullptr;
  if (record.has_value()) rec = const_cast<float*>(f32(*record, n_layers * H, "record"));
  const bool two_spans = lo > Ts && lo < K;
  const int64_t n0 = two_spans ? Ts : K, n = two_spans ? Ts + K - lo : K;

  std::vector<float> xn(H), qkv(Nq + 2 * Nkv), att(Nq), o(H), gu(2 * I), act(I), tmp(H);
  std::vector<int64_t> all(std::max(H, std::max(Nq, I))), idx(H);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  int64_t kept = 0;
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
    attend(qkv.data(), kb, vb, n_kv_heads, g, D, cap, n, n0, two_spans ? lo : 0, static_cast<float>(scaling),
           att.data());
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
    for (int64_t i = 0; i < I; ++i) {
      const float a = gu[i];
      act[i] = a / (1.f + std::exp(-a)) * gu[I + i];
    }
    gather(act.data(), all.data(), I, wdown, H, o.data());
    for (int64_t i = 0; i < H; ++i) x[i] += o[i];
  }
  rms_norm(x, f32(final_norm, H, "final norm"), H, static_cast<float>(eps), xn.data());
  std::copy(xn.begin(), xn.end(), x);
  return kept;
}
