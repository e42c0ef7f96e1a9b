// Batch-1 gather-GEMV for the gathered execution (utils/gathered.py): out = sum_j x[idx_j] * w[idx_j, :].
//
// w is input-major [D, N] (one contiguous row per input channel), so each kept channel's row is streamed
// once, front to back, which the hardware prefetcher follows. Only the kept rows are read: a step at keep
// fraction rho reads rho of the bytes of the dense product.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

// op = the sum of the T per-thread partial results of `len` values each, laid end to end in part.
inline void add_parts(const std::vector<float>& part, int64_t T, int64_t len, float* op) {
  std::copy(part.begin(), part.begin() + len, op);
  for (int64_t t = 1; t < T; ++t) {
    const float* q = part.data() + t * len;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) op[c] += q[c];
  }
}

// R rows at once: o[c] += sum_q xp[ip[j + q]] * wp[ip[j + q] * N + c], q < R. While they stream, the next R rows
// (when j + 2R <= b) are prefetched a cache line at a time: each row is a separate stream, and the hardware
// prefetcher would otherwise restart at every row.
template <int R>
inline void rows(const float* xp, const int64_t* ip, int64_t j, int64_t b, const float* wp, int64_t N, float* o) {
  float s[R];
  const float* r[R];
  for (int q = 0; q < R; ++q) {
    s[q] = xp[ip[j + q]];
    r[q] = wp + ip[j + q] * N;
  }
  int64_t c = 0;
  if (j + 2 * R <= b) {
    const float* p[R];
    for (int q = 0; q < R; ++q) p[q] = wp + ip[j + R + q] * N;
    for (; c + 16 <= N; c += 16) {
      for (int q = 0; q < R; ++q) __builtin_prefetch(p[q] + c, 0, 0);
#pragma omp simd
      for (int64_t e = c; e < c + 16; ++e) {
        float a = 0.f;
        for (int q = 0; q < R; ++q) a += s[q] * r[q][e];
        o[e] += a;
      }
    }
  }
#pragma omp simd
  for (int64_t e = c; e < N; ++e) {
    float a = 0.f;
    for (int q = 0; q < R; ++q) a += s[q] * r[q][e];
    o[e] += a;
  }
}

// out[c] = sum_j xp[ip[j]] * wp[ip[j] * N + c] over n kept rows. Thread t takes the t-th contiguous block of the
// kept rows (for a dense product, one contiguous block of the matrix), streams each row whole, R rows at a time,
// into its own full-length accumulator, and the T partial sums are added at the end. Rows of at most 1024 values
// go 8 at a time (each pass over the accumulator then covers more weight bytes), longer ones 4 at a time.
// On the 2-core CPU (results/bench_gathered/kernel_ab/ab.py, part T) this read SmolLM2's q/k/v, o and down weights
// 1.35-1.73x as fast as rows dealt round-robin to the threads four at a time, gate+up 1.21x, the LM head 1.07x (an
// earlier run: 1.28-1.30x, 1.07x, 1.00x); a step at keep fraction rho reads rho of the bytes of the dense product.
void gather(const float* xp, const int64_t* ip, int64_t n, const float* wp, int64_t N, float* op) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 7) / 8));
  std::vector<float> part(static_cast<size_t>(T * N), 0.f);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = part.data() + t * N;
      const int64_t a = n * t / T, b = n * (t + 1) / T;
      int64_t j = a;
      if (N <= 1024)
        for (; j + 8 <= b; j += 8) rows<8>(xp, ip, j, b, wp, N, o);
      for (; j + 4 <= b; j += 4) rows<4>(xp, ip, j, b, wp, N, o);
      for (; j < b; ++j) rows<1>(xp, ip, j, b, wp, N, o);
    }
  });
  add_parts(part, T, N, op);
}

// out[b, c] = sum_j xp[b * D + ip[j]] * wp[ip[j] * N + c] over n rows ip of an input-major w, for a few rows b < B of
// x (B <= 8): each listed weight row is read once for every row of x (a batch-1 product's bytes). Every row of w for a
// dense product; for a batch whose rows keep different MLP input channels, x masked per row and ip the union of the
// kept channels. Thread t takes the t-th contiguous block of ip, four rows at a time; a column block of them (2 KB
// per row) stays in L1 while it is added into each row's accumulator. On the 2-core CPU the BLAS product of 4 rows
// read SmolLM2's weights at 0.3-0.6 of this loop's speed (benchmarks/bench_layout.py --rows 4, part V).
void gather_rows(const float* xp, int64_t B, int64_t D, const int64_t* ip, int64_t n, const float* wp, int64_t N,
                 float* op) {
  constexpr int64_t CB = 512;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 7) / 8));
  std::vector<float> part(static_cast<size_t>(T * B * N), 0.f);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = part.data() + t * B * N;
      const int64_t a = n * t / T, b = n * (t + 1) / T;
      for (int64_t j = a; j < b; j += 4) {
        const int64_t m = std::min<int64_t>(4, b - j);
        int64_t row[4];
        const float* r[4];
        for (int q = 0; q < 4; ++q) {
          row[q] = ip[j + std::min<int64_t>(q, m - 1)];
          r[q] = wp + row[q] * N;
        }
        for (int64_t c0 = 0; c0 < N; c0 += CB) {
          const int64_t c1 = std::min(N, c0 + CB);
          for (int64_t q = j + 4; q < std::min(b, j + 8); ++q)  // the next four rows' same columns
            for (int64_t c = c0; c < c1; c += 16) __builtin_prefetch(wp + ip[q] * N + c, 0, 0);
          for (int64_t bb = 0; bb < B; ++bb) {
            float s[4];
            for (int q = 0; q < 4; ++q) s[q] = q < m ? xp[bb * D + row[q]] : 0.f;
            float* ob = o + bb * N;
#pragma omp simd
            for (int64_t e = c0; e < c1; ++e) ob[e] += s[0] * r[0][e] + s[1] * r[1][e] + s[2] * r[2][e] + s[3] * r[3][e];
          }
        }
      }
    }
  });
  add_parts(part, T, B * N, op);
}

static void check_args(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "gather_gemv: float32 only");
  TORCH_CHECK(x.dim() == 1 && w.dim() == 2 && x.size(0) == w.size(0), "gather_gemv: shapes");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gather_gemv: layout");
}

// The kept rows idx [n] given.
torch::Tensor gather_gemv(const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& w) {
  check_args(x, w);
  TORCH_CHECK(idx.dtype() == torch::kInt64 && idx.dim() == 1 && idx.is_contiguous(), "gather_gemv: idx");
  const int64_t D = w.size(0), n = idx.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < D, "gather_gemv: index out of range");
  auto out = torch::empty({w.size(1)}, w.options());
  gather(x.data_ptr<float>(), ip, n, w.data_ptr<float>(), w.size(1), out.data_ptr<float>());
  return out;
}

// Every row: the dense product x @ w of an input-major w, by the same streaming loop. On the 2-core CPU it reads
// the weights faster than the BLAS batch-1 product does in either layout (benchmarks/bench_layout.py), so the
// gathered execution's dense products use it too and a pruned product is compared with the same kernel.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w) {
  check_args(x, w);
  std::vector<int64_t> idx(static_cast<size_t>(w.size(0)));
  for (int64_t i = 0; i < w.size(0); ++i) idx[i] = i;
  auto out = torch::empty({w.size(1)}, w.options());
  gather(x.data_ptr<float>(), idx.data(), w.size(0), w.data_ptr<float>(), w.size(1), out.data_ptr<float>());
  return out;
}

// x [B, D] @ w for an input-major w [D, N] and B <= 8 rows (`gather_rows`): over every row of w, or only over the
// rows idx (ascending or not, each once) when given, which is exact when x is zero outside them.
torch::Tensor gemm_rows(const torch::Tensor& x, const torch::Tensor& w, c10::optional<torch::Tensor> idx) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "gemm_rows: float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && x.size(0) >= 1 && x.size(0) <= 8,
              "gemm_rows: shapes (x [B <= 8, D], w [D, N])");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemm_rows: layout");
  const int64_t D = w.size(0);
  std::vector<int64_t> every;
  const int64_t* ip;
  int64_t n;
  if (idx.has_value()) {
    TORCH_CHECK(idx->dtype() == torch::kInt64 && idx->dim() == 1 && idx->is_contiguous(), "gemm_rows: idx");
    ip = idx->data_ptr<int64_t>();
    n = idx->size(0);
    for (int64_t j = 0; j < n; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < D, "gemm_rows: index out of range");
  } else {
    every.resize(static_cast<size_t>(D));
    for (int64_t i = 0; i < D; ++i) every[i] = i;
    ip = every.data();
    n = D;
  }
  auto out = torch::empty({x.size(0), w.size(1)}, w.options());
  if (n == 0) return out.zero_();
  gather_rows(x.data_ptr<float>(), x.size(0), D, ip, n, w.data_ptr<float>(), w.size(1), out.data_ptr<float>());
  return out;
}

// The kept rows chosen here, as the simulated mode chooses them (utils/controls.py `_gate_up_one_row`): every
// channel whose |x| is at least the kth smallest |x| (1-based; ties at the threshold kept), in ascending order.
// Returns the sum and the number of kept channels; saves the separate ops of the selection.
std::tuple<torch::Tensor, int64_t> select_gather_gemv(const torch::Tensor& x, int64_t kth, const torch::Tensor& w) {
  check_args(x, w);
  const int64_t D = w.size(0);
  TORCH_CHECK(kth >= 1 && kth <= D, "select_gather_gemv: kth out of range");
  const float* xp = x.data_ptr<float>();
  std::vector<float> score(D);
  for (int64_t i = 0; i < D; ++i) score[i] = std::fabs(xp[i]);
  std::vector<float> tmp(score);
  std::nth_element(tmp.begin(), tmp.begin() + (kth - 1), tmp.end());
  const float thr = tmp[kth - 1];
  std::vector<int64_t> idx;
  idx.reserve(D - kth + 1);
  for (int64_t i = 0; i < D; ++i)
    if (score[i] >= thr) idx.push_back(i);
  auto out = torch::empty({w.size(1)}, w.options());
  gather(xp, idx.data(), static_cast<int64_t>(idx.size()), w.data_ptr<float>(), w.size(1), out.data_ptr<float>());
  return {out, static_cast<int64_t>(idx.size())};
}

// decode_step.cpp: binds `decode_layers` (every layer of a batch-1 float32 decode step in one call); policy_step.cpp:
// binds `policy_step` (the SOL policy's batch-1 decode step).
void bind_decode_step(pybind11::module_& m);
void bind_policy_step(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_gemv", &gather_gemv, "sum_j x[idx_j] * w[idx_j, :] over the kept rows of an input-major w");
  m.def("gemv", &gemv, "x @ w for an input-major w [D, N] (every row)");
  m.def("gemm_rows", &gemm_rows, "x [B <= 8, D] @ w for an input-major w [D, N] (over the rows idx if given), each "
        "weight row read once", pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("idx") = pybind11::none());
  m.def("select_gather_gemv", &select_gather_gemv,
        "(sum over the channels with |x| >= the kth smallest |x| of x_c * w[c, :], their count)");
  bind_decode_step(m);
  bind_policy_step(m);
}
