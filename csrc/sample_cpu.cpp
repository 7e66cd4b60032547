// Fused conditional sampling on the CPU (design.md §4). OpenMP over groups of queries; each
// group computes its logits against every entry into a per-thread G×M buffer (never Q×M) and
// then either normalises them (probs) or draws by inverse CDF from caller-supplied uniforms.
//
// The drive term y·z_t is a (G×E)·(E×M) product. It is register-blocked like a GEMM: a tile of
// kRJ value rows is packed transposed once per group, so the innermost loop runs over entries
// (SIMD lanes, no horizontal reductions) and every value row is read once per group, not once
// per query. Entries whose location term is masked by the threshold skip the E-wide work.
#include "sample_cpu.h"

#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

// The drive term is a GEMM, logits^T (M×G) = values (M×E) · keys^T (E×G), blocked BLIS-style:
// SIMD lanes run over queries, so the keys are packed once per group and the values are read in
// place (one broadcast per entry and column), never transposed or copied.
template <class T>
constexpr int64_t lanes() { return 32 / int64_t(sizeof(T)); }  // one AVX2 register

template <class T>
constexpr int64_t query_block() { return 2 * lanes<T>(); }  // queries per register block

constexpr int64_t kNE = 6;  // entries per register block: 6 × 2 accumulators + 2 keys + 1 broadcast = 15 registers

constexpr int64_t kKC = 256;  // value columns per pass: a kKC × query_block key panel is 16 KiB, L1-resident

template <class T>
constexpr int64_t entries_per_pass() { return 96 * 4 / int64_t(sizeof(T)); }  // kMC × kKC values: 96 KiB, in L2

template <class T>
struct Scratch {
  std::vector<T> keys;   // the group's keys in panels of query_block rows, interleaved: [panel][k][q]
  std::vector<T> acc;    // drive dots of one pass: [entry block][query panel][kNE][query_block]
  std::vector<T> rows;   // a pass's value columns copied contiguous, when values are strided
  std::vector<T> zeros;  // stands in for the rows past M in the last entry block
  std::vector<T> diff, inv;
  Scratch(const SampleShape& s, int64_t G)
      : keys(padded(G) * s.E),
        acc(padded(G) * entries_per_pass<T>()),
        rows(s.E > 0 && s.M > 0 ? entries_per_pass<T>() * kKC : 0),
        zeros(kKC),
        diff(s.d),
        inv(s.d) {}
  static int64_t padded(int64_t G) { return ((G + query_block<T>() - 1) / query_block<T>()) * query_block<T>(); }
};

int64_t group_size(const SampleShape& s) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  // Large groups read the values fewer times; enough groups keep every thread busy.
  const int64_t want = (s.B * s.Q + 2 * threads - 1) / (2 * threads);
  const int64_t g = std::clamp<int64_t>(want, kNE, 64);
  return std::min(((g + kNE - 1) / kNE) * kNE, s.Q);
}

// acc[r][q] += Σ_k rows[r][k] · panel[k][q] over K columns, r < kNE, q < query_block.
// Explicit 32-byte vectors (GCC/Clang extension) keep all of acc in registers.
template <class T>
inline void block_dots(const T* const* rows, const T* panel, int64_t K, T* acc) {
  typedef T Vec __attribute__((vector_size(32)));
  constexpr int64_t L = lanes<T>(), QB = query_block<T>();
  Vec sum[kNE][2];
  for (int64_t r = 0; r < kNE; ++r)
    for (int64_t c = 0; c < 2; ++c) __builtin_memcpy(&sum[r][c], acc + r * QB + c * L, sizeof(Vec));
  const T *z0 = rows[0], *z1 = rows[1], *z2 = rows[2], *z3 = rows[3], *z4 = rows[4], *z5 = rows[5];
  for (int64_t k = 0; k < K; ++k) {
    Vec y0, y1;
    __builtin_memcpy(&y0, panel + k * QB, sizeof(Vec));
    __builtin_memcpy(&y1, panel + k * QB + L, sizeof(Vec));
    const T z[kNE] = {z0[k], z1[k], z2[k], z3[k], z4[k], z5[k]};
    for (int64_t r = 0; r < kNE; ++r) {
      sum[r][0] += z[r] * y0;
      sum[r][1] += z[r] * y1;
    }
  }
  for (int64_t r = 0; r < kNE; ++r)
    for (int64_t c = 0; c < 2; ++c) __builtin_memcpy(acc + r * QB + c * L, &sum[r][c], sizeof(Vec));
}

// log k(query q, entry t) · location_scale (-inf where masked) for every entry t, into row.
// Returns whether any entry is within the threshold.
template <class T, int D>
bool location_row(const SampleShape& s, const Geometry<T, D>& geo, int64_t b, int64_t q, View3<const T> qloc,
                  View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, T* row, Scratch<T>& w) {
  const T ninf = neg_inf<T>(), scale = T(s.location_scale);  // scale > 0: -inf stays -inf
  int64_t matched = 0;
  if (D > 0 && geo.uniform_var && mloc.s2 == 1 && mloc.s1 == D) {
    // One shared variance and contiguous locations: a loop the compiler vectorises.
    T ql[D > 0 ? D : 1];
    for (int64_t i = 0; i < D; ++i) ql[i] = qloc(b, q, i);
    const T* ml = mloc.row(b, 0);
    for (int64_t t = 0; t < s.M; ++t) {
      T dist2 = 0;
      for (int64_t i = 0; i < D; ++i) dist2 += (ql[i] - ml[t * D + i]) * (ql[i] - ml[t * D + i]);
      const T sc = geo.uniform_score(dist2);
      matched += sc != ninf;
      row[t] = sc * scale;
    }
    return matched > 0;
  }
  const auto ql = row_ref(qloc, b, q), qv = row_ref(qvar, b, q);
  for (int64_t t = 0; t < s.M; ++t) {
    const T sc = geo.score(ql, qv, row_ref(mloc, b, t), row_ref(mvar, b, t), w.diff.data(), w.inv.data());
    matched += sc != ninf;
    row[t] = sc * scale;
  }
  return matched > 0;
}

// Logits of queries q0 .. q0+G-1 of batch row b against all M entries, into rows of `logits`
// (row stride M).
template <class T, int D>
void group_logits(const SampleShape& s, const Geometry<T, D>& geo, int64_t b, int64_t q0, int64_t G,
                  View3<const T> key, View3<const T> values, View3<const T> qloc, View3<const T> qvar,
                  View3<const T> mloc, View3<const T> mvar, T* logits, Scratch<T>& w) {
  const int64_t M = s.M, E = s.E;
  const T ninf = neg_inf<T>();
  // Location term first, so masked entries can skip the drive term below.
  for (int64_t g = 0; g < G; ++g) {
    T* row = logits + g * M;
    if (s.location_scale <= 0) {
      std::fill(row, row + M, T(0));
      continue;
    }
    if (!location_row(s, geo, b, q0 + g, qloc, qvar, mloc, mvar, row, w))
      std::fill(row, row + M, T(0));  // every entry masked: the drive term alone
  }
  const T scale = T(s.drive_scale);
  if (G < kNE) {
    // Too few queries for the register block (Q = 1 is matrix-vector): one streamed dot per pair.
    // When this is the call's only group, the caller's team has one thread (an inactive region),
    // so this nested loop may spread the entries over all threads; otherwise it runs serially.
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < E; ++k) w.keys[g * E + k] = key(b, q0 + g, k);
#pragma omp parallel for schedule(static) if (M * E * G >= (int64_t(1) << 20))
    for (int64_t t = 0; t < M; ++t) {
      const T* z = values.row(b, t);
      for (int64_t g = 0; g < G; ++g) {
        if (logits[g * M + t] == ninf) continue;
        const T* y = w.keys.data() + g * E;
        T acc = 0;
        if (values.s2 == 1) {
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < E; ++k) acc += y[k] * z[k];
        } else {
          for (int64_t k = 0; k < E; ++k) acc += y[k] * z[k * values.s2];
        }
        logits[g * M + t] += acc * scale;
      }
    }
    return;
  }
  constexpr int64_t QB = query_block<T>(), MC = entries_per_pass<T>();
  const int64_t panels = Scratch<T>::padded(G) / QB;
  std::fill(w.keys.begin(), w.keys.end(), T(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < E; ++k) w.keys[(g / QB) * E * QB + k * QB + g % QB] = key(b, q0 + g, k);
  const bool contiguous = values.s2 == 1;
  for (int64_t t0 = 0; t0 < M; t0 += MC) {
    const int64_t nt = std::min(MC, M - t0), blocks = (nt + kNE - 1) / kNE;
    // An entry block whose every (query, entry) pair is masked skips its dots.
    bool live[MC / kNE];
    bool any_live = false;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      live[blk] = false;
      const int64_t j1 = std::min(nt, (blk + 1) * kNE);
      for (int64_t g = 0; g < G && !live[blk]; ++g)
        for (int64_t j = blk * kNE; j < j1; ++j) live[blk] |= logits[g * M + t0 + j] != ninf;
      any_live |= live[blk];
    }
    if (!any_live) continue;
    std::fill(w.acc.begin(), w.acc.begin() + blocks * panels * kNE * QB, T(0));
    for (int64_t k0 = 0; k0 < E; k0 += kKC) {
      const int64_t K = std::min(kKC, E - k0);
      if (!contiguous)
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t k = 0; k < K; ++k) w.rows[j * kKC + k] = values(b, t0 + j, k0 + k);
      for (int64_t p = 0; p < panels; ++p) {
        const T* panel = w.keys.data() + p * E * QB + k0 * QB;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          if (!live[blk]) continue;
          const T* rows[kNE];
          for (int64_t r = 0; r < kNE; ++r) {
            const int64_t j = blk * kNE + r;
            rows[r] = j >= nt ? w.zeros.data() : contiguous ? values.row(b, t0 + j) + k0 : w.rows.data() + j * kKC;
          }
          block_dots<T>(rows, panel, K, w.acc.data() + (blk * panels + p) * kNE * QB);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      T* row = logits + g * M + t0;
      const T* dots = w.acc.data() + (g / QB) * kNE * QB + g % QB;
      for (int64_t blk = 0; blk < blocks; ++blk, row += kNE, dots += panels * kNE * QB) {
        const int64_t n = std::min(kNE, nt - blk * kNE);
        for (int64_t r = 0; r < n; ++r)
          if (row[r] != ninf) row[r] += dots[r * QB] * scale;
      }
    }
  }
}

// Runs body(b, q0, G, logits, scratch) for every query group, in parallel; logits points at
// rows of `out` when given (probs), else at a per-thread G×M buffer.
template <class T, class Body>
void for_each_group(const SampleShape& s, T* out, Body&& body) {
  const int64_t G = group_size(s);
  const int64_t groups_per_row = (s.Q + G - 1) / G;
  const int64_t tasks = s.B * groups_per_row;
  int threads = 1;
#ifdef _OPENMP
  threads = int(std::min<int64_t>(omp_get_max_threads(), tasks));  // never wake threads with no group to run
#endif
#pragma omp parallel num_threads(threads)
  {
    Scratch<T> w(s, G);
    std::vector<T> own(out ? 0 : G * s.M);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / groups_per_row, q0 = (task % groups_per_row) * G;
      const int64_t n = std::min(G, s.Q - q0);
      body(b, q0, n, out ? out + (b * s.Q + q0) * s.M : own.data(), w);
    }
  }
}

template <class T>
T row_max(const T* row, int64_t M) {
  T mx = neg_inf<T>();
  for (int64_t t = 0; t < M; ++t) mx = std::max(mx, row[t]);
  return mx;
}

template <class T, int D>
void probs_impl(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, T* probs) {
  const auto geo = sample_geometry<T, D>(s);
  for_each_group<T>(s, probs, [&](int64_t b, int64_t q0, int64_t G, T* logits, Scratch<T>& w) {
    group_logits<T, D>(s, geo, b, q0, G, key, values, qloc, qvar, mloc, mvar, logits, w);
    for (int64_t g = 0; g < G; ++g) {
      T* row = logits + g * s.M;
      const T mx = row_max(row, s.M);
      for (int64_t t = 0; t < s.M; ++t) row[t] = exp_nonpositive(row[t] - mx);  // vectorised; -inf -> 0
      double total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t t = 0; t < s.M; ++t) total += double(row[t]);
      const T inv_total = T(1.0 / total);
      for (int64_t t = 0; t < s.M; ++t) row[t] *= inv_total;
    }
  });
}

template <class T, int D>
void indices_impl(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                  View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, const double* uniforms,
                  int64_t* idx) {
  const auto geo = sample_geometry<T, D>(s);
  for_each_group<T>(s, nullptr, [&](int64_t b, int64_t q0, int64_t G, T* logits, Scratch<T>& w) {
    group_logits<T, D>(s, geo, b, q0, G, key, values, qloc, qvar, mloc, mvar, logits, w);
    std::vector<double> cdf(s.M);
    for (int64_t g = 0; g < G; ++g) {
      T* row = logits + g * s.M;  // this group's own buffer: the weights may overwrite it
      const T mx = row_max(row, s.M);
      for (int64_t t = 0; t < s.M; ++t) row[t] = exp_nonpositive(row[t] - mx);  // vectorised; -inf -> 0
      double total = 0;
      for (int64_t t = 0; t < s.M; ++t) {
        total += double(row[t]);
        cdf[t] = total;
      }
      // u < 1, but u * total may round up to total; the largest double below it still lands on
      // an entry of positive probability.
      const double top = std::nextafter(total, 0.0);
      const int64_t bq = b * s.Q + q0 + g;
      for (int64_t i = 0; i < s.S; ++i) {
        const double target = std::min(uniforms[bq * s.S + i] * total, top);
        idx[bq * s.S + i] = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
      }
    }
  });
}

}  // namespace

template <class T>
void conditional_probs_cpu(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                           View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, T* probs) {
  dispatch_dim(s.d, [&]<int D>() { probs_impl<T, D>(s, key, values, qloc, qvar, mloc, mvar, probs); });
}

template <class T>
void conditional_sample_indices_cpu(const SampleShape& s, View3<const T> key, View3<const T> values,
                                    View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                                    View3<const T> mvar, const double* uniforms, int64_t* idx) {
  dispatch_dim(s.d, [&]<int D>() { indices_impl<T, D>(s, key, values, qloc, qvar, mloc, mvar, uniforms, idx); });
}

#define RK_INSTANTIATE(T)                                                                                      \
  template void conditional_probs_cpu<T>(const SampleShape&, View3<const T>, View3<const T>, View3<const T>,  \
                                         View3<const T>, View3<const T>, View3<const T>, T*);                 \
  template void conditional_sample_indices_cpu<T>(const SampleShape&, View3<const T>, View3<const T>,         \
                                                  View3<const T>, View3<const T>, View3<const T>,             \
                                                  View3<const T>, const double*, int64_t*);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
#undef RK_INSTANTIATE

}  // namespace rk
