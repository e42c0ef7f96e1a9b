#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <algorithm>

inline void add_parts(const std::vector<float>& part, int64_t T, int64_t len, float* op) {
  std::copy(part.begin(), part.begin() + len, op);
  for (int64_t t = 1; t < T; ++t) {
    const float* q = part.data() + t * len;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) op[c] += q[c];
  }
}

// R rows at once; prefetch rows j+DIST .. j+DIST+R-1 (DIST multiple of R) when present.
template <int R, int DIST>
inline void rows(const float* xp, const int64_t* ip, int64_t j, int64_t b, const float* wp, int64_t N, float* o) {
  float s[R];
  const float* r[R];
  for (int q = 0; q < R; ++q) { s[q] = xp[ip[j + q]]; r[q] = wp + ip[j + q] * N; }
  int64_t c = 0;
  if (DIST > 0 && j + DIST + R <= b) {
    const float* p[R];
    for (int q = 0; q < R; ++q) p[q] = wp + ip[j + DIST + q] * N;
    for (; c + 16 <= N; c += 16) {
      for (int q = 0; q < R; ++q) __builtin_prefetch(p[q] + c, 0, 0);
#pragma omp simd
      for (int64_t e = c; e < c + 16; ++e) { float a = 0.f; for (int q = 0; q < R; ++q) a += s[q] * r[q][e]; o[e] += a; }
    }
  }
#pragma omp simd
  for (int64_t e = c; e < N; ++e) { float a = 0.f; for (int q = 0; q < R; ++q) a += s[q] * r[q][e]; o[e] += a; }
}

template <int R, int DIST>
void gather(const float* xp, const int64_t* ip, int64_t n, const float* wp, int64_t N, float* op) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 7) / 8));
  std::vector<float> part(static_cast<size_t>(T * N), 0.f);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = part.data() + t * N;
      const int64_t a = n * t / T, b = n * (t + 1) / T;
      int64_t j = a;
      for (; j + R <= b; j += R) rows<R, DIST>(xp, ip, j, b, wp, N, o);
      for (; j < b; ++j) rows<1, 0>(xp, ip, j, b, wp, N, o);
    }
  });
  add_parts(part, T, N, op);
}

torch::Tensor run(int64_t variant, const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& w) {
  auto out = torch::empty({w.size(1)}, w.options());
  const float* xp = x.data_ptr<float>(); const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t n = idx.size(0), N = w.size(1); const float* wp = w.data_ptr<float>(); float* op = out.data_ptr<float>();
  switch (variant) {
    case 0: gather<4, 4>(xp, ip, n, wp, N, op); break;
    case 1: gather<8, 8>(xp, ip, n, wp, N, op); break;
    case 2: gather<4, 8>(xp, ip, n, wp, N, op); break;
    case 3: gather<2, 4>(xp, ip, n, wp, N, op); break;
    case 4: gather<4, 12>(xp, ip, n, wp, N, op); break;
    default: gather<4, 0>(xp, ip, n, wp, N, op);
  }
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
