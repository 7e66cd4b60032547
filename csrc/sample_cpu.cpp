// Fused conditional sampling on the CPU (design.md §4). OpenMP over groups of queries; each
// group computes its logits against every entry into a per-thread G×M buffer (never Q×M) and
// then either normalises them (probs) or draws by inverse CDF from caller-supplied uniforms.
//
// The drive term y·z_t is a (G×E)·(E×M) product. It is register-blocked like a GEMM: a tile of
// kRJ value rows is packed transposed once per group, so the innermost loop runs over entries
// (SIMD lanes, no horizontal reductions) and every value row is read once per group, not once
// per query. Entries whose location term is masked by the threshold skip the E-wide work.
#include "sample_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

constexpr int64_t kRQ = 6;  // queries per register block (6 × 2 accumulators + 2 loads + 1 broadcast = 15 AVX2 registers)

template <class T>
constexpr int64_t entries_per_block() { return 64 / int64_t(sizeof(T)); }  // acc[kRQ][·] fits the registers

constexpr int64_t kKC = 256;  // value columns per packed chunk: a kKC × kRJ chunk stays in L1

template <class T>
struct Scratch {
  std::vector<T> keys;    // the group's keys in blocks of kRQ rows, interleaved: [block][k][r]
  std::vector<T> packed;  // kRJ value rows transposed, kKC columns at a time: kKC × kRJ
  std::vector<T> tile;    // the drive dots of the group against the current kRJ entries: Gp × kRJ
  std::vector<T> diff, inv;
  Scratch(const SampleShape& s, int64_t G)
      : keys(padded(G) * s.E), packed(kKC * entries_per_block<T>()), tile(padded(G) * entries_per_block<T>()),
        diff(s.d), inv(s.d) {}
  static int64_t padded(int64_t G) { return ((G + kRQ - 1) / kRQ) * kRQ; }
};

int64_t group_size(const SampleShape& s) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  // Large groups read the values fewer times; enough groups keep every thread busy.
  const int64_t want = (s.B * s.Q + 2 * threads - 1) / (2 * threads);
  const int64_t g = std::clamp<int64_t>(want, kRQ, 64);
  return std::min(((g + kRQ - 1) / kRQ) * kRQ, s.Q);
}

// acc[r][j] += keys[r] · (column j of the packed chunk) over K columns; keys interleaved [k][r].
// Explicit 32-byte vectors (GCC/Clang extension) keep all of acc in registers.
template <class T>
inline void block_dots(const T* keys, const T* packed, int64_t K, T* acc) {
  typedef T Vec __attribute__((vector_size(32)));
  constexpr int64_t kRJ = entries_per_block<T>();
  constexpr int64_t kLanes = 32 / int64_t(sizeof(T));
  constexpr int64_t kVecs = kRJ / kLanes;
  Vec sum[kRQ][kVecs];
  for (int64_t r = 0; r < kRQ; ++r)
    for (int64_t c = 0; c < kVecs; ++c) __builtin_memcpy(&sum[r][c], acc + r * kRJ + c * kLanes, sizeof(Vec));
  for (int64_t k = 0; k < K; ++k) {
    Vec v[kVecs];
    for (int64_t c = 0; c < kVecs; ++c) __builtin_memcpy(&v[c], packed + k * kRJ + c * kLanes, sizeof(Vec));
    for (int64_t r = 0; r < kRQ; ++r) {
      const T kr = keys[k * kRQ + r];
      for (int64_t c = 0; c < kVecs; ++c) sum[r][c] += kr * v[c];
    }
  }
  for (int64_t r = 0; r < kRQ; ++r)
    for (int64_t c = 0; c < kVecs; ++c) __builtin_memcpy(acc + r * kRJ + c * kLanes, &sum[r][c], sizeof(Vec));
}

// Logits of queries q0 .. q0+G-1 of batch row b against all M entries, into rows of `logits`
// (row stride M).
template <class T, int D>
void group_logits(const SampleShape& s, const Geometry<T, D>& geo, int64_t b, int64_t q0, int64_t G,
                  View3<const T> key, View3<const T> values, View3<const T> qloc, View3<const T> qvar,
                  View3<const T> mloc, View3<const T> mvar, T* logits, Scratch<T>& w) {
  constexpr int64_t kRJ = entries_per_block<T>();
  const int64_t M = s.M, E = s.E;
  const T ninf = neg_inf<T>();
  // Location term first, so masked entries can skip the drive term below.
  for (int64_t g = 0; g < G; ++g) {
    T* row = logits + g * M;
    if (s.location_scale <= 0) {
      std::fill(row, row + M, T(0));
      continue;
    }
    const auto ql = row_ref(qloc, b, q0 + g), qv = row_ref(qvar, b, q0 + g);
    bool any_match = false;
    for (int64_t t = 0; t < M; ++t) {
      const T sc = geo.score(ql, qv, row_ref(mloc, b, t), row_ref(mvar, b, t), w.diff.data(), w.inv.data());
      any_match |= sc != ninf;
      row[t] = sc == ninf ? ninf : sc * T(s.location_scale);
    }
    if (!any_match) std::fill(row, row + M, T(0));  // every entry masked: the drive term alone
  }
  const T scale = T(s.drive_scale);
  if (G < kRQ) {
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
  const int64_t Gp = Scratch<T>::padded(G);
  std::fill(w.keys.begin(), w.keys.end(), T(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < E; ++k) w.keys[(g / kRQ) * E * kRQ + k * kRQ + g % kRQ] = key(b, q0 + g, k);
  T* packed = w.packed.data();
  for (int64_t j0 = 0; j0 < M; j0 += kRJ) {
    const int64_t J = std::min(kRJ, M - j0);
    bool live = false;
    for (int64_t g = 0; g < G && !live; ++g)
      for (int64_t j = 0; j < J; ++j) live |= logits[g * M + j0 + j] != ninf;
    if (!live) continue;
    std::fill(w.tile.begin(), w.tile.end(), T(0));
    for (int64_t k0 = 0; k0 < E; k0 += kKC) {
      const int64_t K = std::min(kKC, E - k0);
      for (int64_t j = 0; j < kRJ; ++j) {
        if (j < J) {
          for (int64_t k = 0; k < K; ++k) packed[k * kRJ + j] = values(b, j0 + j, k0 + k);
        } else {
          for (int64_t k = 0; k < K; ++k) packed[k * kRJ + j] = T(0);
        }
      }
      for (int64_t g0 = 0; g0 < Gp; g0 += kRQ)
        block_dots<T>(w.keys.data() + g0 * E + k0 * kRQ, packed, K, w.tile.data() + g0 * kRJ);
    }
    for (int64_t g = 0; g < G; ++g) {
      T* row = logits + g * M + j0;
      for (int64_t j = 0; j < J; ++j)
        if (row[j] != ninf) row[j] += w.tile[g * kRJ + j] * scale;
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
      double total = 0;
      for (int64_t t = 0; t < s.M; ++t) {
        row[t] = std::exp(row[t] - mx);
        total += row[t];
      }
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
      const T* row = logits + g * s.M;
      const T mx = row_max(row, s.M);
      double total = 0;
      for (int64_t t = 0; t < s.M; ++t) {
        total += double(std::exp(row[t] - mx));
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
