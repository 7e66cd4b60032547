// Fused conditional sampling on the CPU (design.md §4).
//
// Queries go in groups of G ≤ kMaxGroup (make_plan): a group's logits against every entry are
// computed into G×M rows (probs: the output's own rows; indices: a buffer, G bounded so that it
// stays within kLogitsBytes, so never Q×M for large Q·M), then normalised (probs) or turned into
// an inverse CDF that the caller's uniforms are looked up in (indices).
//
// Threads: when the groups share out evenly and one buffer per thread fits the bound, each thread
// takes whole groups (no barriers). Otherwise a group is shared by the team: the threads split its
// entries (each computes the logits of all G queries for its passes of entries), then its queries
// (softmax, draws). Either way each group reads the values once, and the bigger G, the fewer times
// the whole M×E values stream from memory.
//
// The drive term y·z_t is the GEMM logits^T (M×G) = values (M×E) · keys^T (E×G), blocked like
// BLIS with the SIMD lanes over queries: a register block is kNE entries × 2 vectors of queries;
// the keys are packed once per group into panels of query_block queries, column-interleaved (a
// column of a panel is two vector loads); the values are read in place, one broadcast per
// (entry, column), never transposed or copied (a copy of each pass's values, even prefetched,
// measured slower: the values are read from memory once per group anyway). Loop order per pass
// of entries_per_pass entries: kKC-column chunk, then query panel (its kKC columns stay in L1
// across the pass), then block of kNE entries (the pass's kKC columns stay in L2 across the
// panels). Entries whose location term is masked for every query of the group skip the E-wide
// work. Groups of fewer than kNE queries (Q = 1 is matrix-vector) take one streamed dot per pair.
//
// The draws: a vectorised exp (fast_exp.h), the CDF summed in blocks of kCdfBlock entries
// (independent chains instead of one of M dependent adds), branchless binary searches over the
// block ends (kSearchBatch draws in lockstep, so their dependent loads overlap), then a branchless
// count over the block's stored partial sums.
#include "sample_cpu.h"

#include "fast_exp.h"
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

// One SIMD register of the drive term's GEMM (csrc/gemm.h): a ymm where the build targets AVX or
// wider (the blocking below was tuned for it), else the 16 bytes every 64-bit target has.
constexpr int64_t kVectorBytes = kNativeVectorBytes >= 32 ? 32 : 16;

template <class T>
constexpr int64_t lanes() { return Simd<T, kVectorBytes>::L; }

template <class T>
constexpr int64_t query_block() { return 2 * lanes<T>(); }  // queries per register block (a key panel)

constexpr int64_t kNE = 6;  // entries per register block: 6 × 2 accumulators + 2 keys + 1 broadcast = 15 registers

constexpr int64_t kKC = 256;  // value columns per chunk: a kKC × query_block key panel (16 KiB with AVX) stays in L1

template <class T>
constexpr int64_t entries_per_pass() { return 96 * 4 / int64_t(sizeof(T)); }  // × kKC columns: 96 KiB, in L2

// The draws' G×M logits buffers in all (one shared, or one per thread where that fits), unless M
// is so large that not even one query panel fits.
constexpr int64_t kLogitsBytes = int64_t(8) << 20;
constexpr int64_t kMaxGroup = 128;  // larger groups measured no faster; smaller ones reuse each pass less
// G·M·(E + 16) above which a group is worth sharing: ~1 ms of one thread's work, so that three
// barriers cost little even when another process holds a core and a thread misses its slice.
constexpr int64_t kSplitWork = int64_t(1) << 22;

template <class T>
int64_t padded_group(int64_t G) { return ((G + query_block<T>() - 1) / query_block<T>()) * query_block<T>(); }

struct Plan {
  int64_t G;               // queries per group
  int64_t groups_per_row;  // groups per batch row
  int64_t tasks;           // groups in the call: B × groups_per_row
  int64_t passes;          // passes of entries_per_pass entries over M
  int threads;
  bool split;  // every thread works on every group (else each thread takes whole groups)
};

template <class T>
Plan make_plan(const SampleShape& s, bool buffered) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  Plan p;
  // Large groups read each value row fewer times and reuse it from L2 for more key panels.
  const int64_t fit = kLogitsBytes / (std::max<int64_t>(s.M, 1) * int64_t(sizeof(T)));
  const int64_t cap = std::max(query_block<T>(), std::min(kMaxGroup, fit) / query_block<T>() * query_block<T>());
  p.G = std::max<int64_t>(1, std::min(s.Q, cap));
  p.groups_per_row = (s.Q + p.G - 1) / p.G;
  p.tasks = s.B * p.groups_per_row;
  p.passes = (s.M + entries_per_pass<T>() - 1) / entries_per_pass<T>();
  // Whole groups per thread need no barriers, but idle threads when the groups do not share out
  // evenly, and one logits buffer per thread; a group shared by the team needs enough work and
  // enough passes of entries to go round.
  const bool even = p.tasks % threads == 0 || p.tasks >= 4 * threads;
  const bool buffers_fit = !buffered || threads * p.G * s.M * int64_t(sizeof(T)) <= kLogitsBytes;
  p.split = threads > 1 && !(even && buffers_fit) && p.G * s.M * (s.E + 16) >= kSplitWork &&
            p.passes >= 2 * threads;
  // never wake threads with no group to run
  p.threads = p.split ? threads : int(std::max<int64_t>(1, std::min<int64_t>(threads, p.tasks)));
  return p;
}

// One call's inputs.
template <class T, int D>
struct Call {
  const SampleShape& s;
  Geometry<T, D> geo;
  View3<const T> key, values, qloc, qvar, mloc, mvar;
};

constexpr int64_t kCdfBlock = 16;  // entries per block of the draws' CDF
inline int64_t cdf_blocks(int64_t M) { return (M + kCdfBlock - 1) / kCdfBlock; }

// Per-thread working memory.
template <class T>
struct Scratch {
  std::vector<T> acc;    // one pass's drive dots: [entry block][query panel][kNE][query_block]
  std::vector<T> rows;   // a pass's value columns copied contiguous, when values are strided
  std::vector<T> zeros;  // stands in for the rows past M in a pass's last entry block
  std::vector<T> diff, inv;  // Geometry::score's per-dimension outputs
  std::vector<double> cdf;   // indices: one query's CDF at the ends of its blocks of kCdfBlock entries
  std::vector<double> part;  // indices: its partial sums within each block, +inf past M
  Scratch(const SampleShape& s, int64_t G, bool strided_values, bool draws)
      : acc(padded_group<T>(G) * entries_per_pass<T>()),
        rows(strided_values ? entries_per_pass<T>() * kKC : 0),
        zeros(kKC),
        diff(s.d),
        inv(s.d),
        cdf(draws ? cdf_blocks(s.M) : 0),
        part(draws ? cdf_blocks(s.M) * kCdfBlock : 0, std::numeric_limits<double>::infinity()) {}
};

// row[t] = log k(query q, entry t) · location_scale (-inf where masked) for every entry t; zeros
// (the drive term alone) when there is no location term or the threshold masks every entry. (A
// score that overflows to -inf is not masked: a row of only such logits is unusable.)
template <class T, int D>
void location_row(const Call<T, D>& c, int64_t b, int64_t q, T* row, Scratch<T>& w) {
  const SampleShape& s = c.s;
  if (s.location_scale <= 0) {
    std::fill(row, row + s.M, T(0));
    return;
  }
  const T ninf = neg_inf<T>(), scale = T(s.location_scale);  // scale > 0: -inf stays -inf
  int64_t matched = 0;
  if (D > 0 && c.geo.uniform_var && c.mloc.sc == 1 && c.mloc.sr == D) {
    // One shared variance and contiguous locations: a loop the compiler vectorises.
    T ql[D > 0 ? D : 1];
    for (int64_t i = 0; i < D; ++i) ql[i] = c.qloc(b, q, i);
    const T* ml = c.mloc.row(b, 0);
    const T thr2 = c.geo.thr2 < 0 ? -ninf : c.geo.thr2;
    for (int64_t t = 0; t < s.M; ++t) {
      T dist2 = 0;
      for (int64_t i = 0; i < D; ++i) dist2 += (ql[i] - ml[t * D + i]) * (ql[i] - ml[t * D + i]);
      matched += !(dist2 > thr2);
      row[t] = c.geo.uniform_score(dist2) * scale;
    }
  } else {
    const auto ql = row_ref(c.qloc, b, q), qv = row_ref(c.qvar, b, q);
    for (int64_t t = 0; t < s.M; ++t) {
      const auto ml = row_ref(c.mloc, b, t);
      row[t] = c.geo.score(ql, qv, ml, row_ref(c.mvar, b, t), w.diff.data(), w.inv.data()) * scale;
      matched += c.geo.within_threshold(ql, ml);
    }
  }
  if (matched == 0) std::fill(row, row + s.M, T(0));
}

// Groups smaller than a register block (Q = 1 is matrix-vector) take one streamed dot per pair.
inline bool streamed(int64_t G) { return G < kNE; }

// Pieces the keys of a group are packed in, one per call of pack_keys.
template <class T>
int64_t key_units(int64_t G) { return streamed(G) ? G : padded_group<T>(G) / query_block<T>(); }

// Packs piece u of the keys of queries q0 .. q0+G-1: query u's row (streamed), else query panel
// u as [column][query_block], zero past G.
template <class T, int D>
void pack_keys(const Call<T, D>& c, int64_t b, int64_t q0, int64_t G, int64_t u, T* keys) {
  const int64_t E = c.s.E;
  if (streamed(G)) {
    for (int64_t k = 0; k < E; ++k) keys[u * E + k] = c.key(b, q0 + u, k);
    return;
  }
  constexpr int64_t QB = query_block<T>();
  T* panel = keys + u * E * QB;
  for (int64_t j = 0; j < QB; ++j) {
    const int64_t g = u * QB + j;
    for (int64_t k = 0; k < E; ++k) panel[k * QB + j] = g < G ? c.key(b, q0 + g, k) : T(0);
  }
}

// Adds the drive term of a group's G queries (keys packed by pack_keys) for the entries of pass
// `pass` to their logits (rows of stride M), leaving masked (-inf) logits alone. Passes write
// disjoint columns, so threads may run different passes of one group at once.
template <class T, int D>
void drive_pass(const Call<T, D>& c, int64_t b, int64_t G, const T* keys, int64_t pass, T* logits,
                Scratch<T>& w) {
  constexpr int64_t QB = query_block<T>(), MC = entries_per_pass<T>();
  const int64_t M = c.s.M, E = c.s.E, t0 = pass * MC, nt = std::min(MC, M - t0);
  const T ninf = neg_inf<T>(), scale = T(c.s.drive_scale);
  const View3<const T>& values = c.values;
  if (streamed(G)) {
    for (int64_t t = t0; t < t0 + nt; ++t) {
      const T* z = values.row(b, t);
      for (int64_t g = 0; g < G; ++g) {
        if (logits[g * M + t] == ninf) continue;
        const T* y = keys + g * E;
        T acc = 0;
        if (values.sc == 1) {
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < E; ++k) acc += y[k] * z[k];
        } else {
          for (int64_t k = 0; k < E; ++k) acc += y[k] * z[k * values.sc];
        }
        logits[g * M + t] += acc * scale;
      }
    }
    return;
  }
  const int64_t panels = padded_group<T>(G) / QB, blocks = (nt + kNE - 1) / kNE;
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
  if (!any_live) return;
  std::fill(w.acc.begin(), w.acc.begin() + blocks * panels * kNE * QB, T(0));
  const bool contiguous = values.sc == 1;
  for (int64_t k0 = 0; k0 < E; k0 += kKC) {
    const int64_t K = std::min(kKC, E - k0);
    if (!contiguous)
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t k = 0; k < K; ++k) w.rows[j * kKC + k] = values(b, t0 + j, k0 + k);
    for (int64_t p = 0; p < panels; ++p) {
      const T* panel = keys + p * E * QB + k0 * QB;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        if (!live[blk]) continue;
        const T* rows[kNE];
        for (int64_t r = 0; r < kNE; ++r) {
          const int64_t j = blk * kNE + r;
          rows[r] = j >= nt ? w.zeros.data() : contiguous ? values.row(b, t0 + j) + k0 : w.rows.data() + j * kKC;
        }
        block_dots<T, kVectorBytes, kNE>(RowPointers<T, kNE>{rows}, panel, QB, K,
                                                   w.acc.data() + (blk * panels + p) * kNE * QB, QB);
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

// Runs body(i) for i in [0, n): shared out among the team (a worksharing loop, ending in a
// barrier unless `then_wait` is false) when `split`, else all on the calling thread. Called inside
// the parallel region.
template <class F>
void share(bool split, int64_t n, F&& body, bool then_wait = true) {
  if (!split) {
    for (int64_t i = 0; i < n; ++i) body(i);
  } else if (then_wait) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

// Computes the logits of every query group and runs finish(b, q, row, scratch) on each query's
// row of M logits (its own to overwrite); rows are those of `out` when given (probs), else of a
// G×M buffer (one per thread when threads take whole groups).
template <class T, int D, class Finish>
void for_each_query(const Call<T, D>& c, T* out, bool draws, Finish&& finish) {
  const SampleShape& s = c.s;
  const Plan plan = make_plan<T>(s, out == nullptr);
  if (plan.tasks == 0 || s.M == 0) return;
  const int64_t G = plan.G, M = s.M;
  const int slots = plan.split ? 1 : plan.threads;
  const int64_t key_size = padded_group<T>(G) * s.E;
  std::vector<T> keys(slots * key_size);
  std::unique_ptr<T[]> own(out ? nullptr : new T[slots * G * M]);  // uninitialised: every logit is written
#pragma omp parallel num_threads(plan.threads)
  {
    Scratch<T> w(s, G, c.values.sc != 1, draws);
    auto run = [&](int64_t task, int slot) {
      const int64_t b = task / plan.groups_per_row, q0 = (task % plan.groups_per_row) * G;
      const int64_t n = std::min(G, s.Q - q0);
      T* logits = out ? out + (b * s.Q + q0) * M : own.get() + slot * G * M;
      T* packed = keys.data() + slot * key_size;
      // (the packing does not read the logits: one barrier after both)
      share(plan.split, n, [&](int64_t g) { location_row(c, b, q0 + g, logits + g * M, w); }, false);
      share(plan.split, key_units<T>(n), [&](int64_t u) { pack_keys(c, b, q0, n, u, packed); });
      share(plan.split, plan.passes, [&](int64_t pass) { drive_pass(c, b, n, packed, pass, logits, w); });
      share(plan.split, n, [&](int64_t g) { finish(b, q0 + g, logits + g * M, w); });
    };
    if (plan.split) {
      for (int64_t task = 0; task < plan.tasks; ++task) run(task, 0);
    } else {
      int slot = 0;
#ifdef _OPENMP
      slot = omp_get_thread_num();
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < plan.tasks; ++task) run(task, slot);
    }
  }
}

// The row's largest logit, or NaN when the row is unusable (sample_cpu.h): a logit is NaN or
// +inf, or every logit is -inf. Only an overflow of the logits in T causes that.
template <class T>
T usable_row_max(const T* row, int64_t M) {
  T mx = neg_inf<T>();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)  // vectorised (std::max's NaN order would keep it scalar)
  for (int64_t t = 0; t < M; ++t) {
    mx = row[t] > mx ? row[t] : mx;
    nan |= row[t] != row[t];
  }
  return nan || !std::isfinite(mx) ? std::numeric_limits<T>::quiet_NaN() : mx;
}

// row[t] = exp(row[t] - max) (masked: 0), returning their sum (≥ 1: the max contributes 1), or
// NaN for an unusable row (left as it was).
template <class T>
double exp_shifted_row(T* row, int64_t M) {
  const T mx = usable_row_max(row, M);
  if (mx != mx) return std::numeric_limits<double>::quiet_NaN();
  for (int64_t t = 0; t < M; ++t) row[t] = exp_nonpositive(row[t] - mx);  // vectorised
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < M; ++t) total += double(row[t]);
  return total;
}

template <class T, int D>
Call<T, D> make_call(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                     View3<const T> qvar, View3<const T> mloc, View3<const T> mvar) {
  return Call<T, D>{s, sample_geometry<T, D>(s), key, values, qloc, qvar, mloc, mvar};
}

template <class T, int D>
void probs_impl(const Call<T, D>& c, T* probs) {
  for_each_query(c, probs, false, [&](int64_t, int64_t, T* row, Scratch<T>&) {
    const double total = exp_shifted_row(row, c.s.M);
    if (total != total) {  // unusable: NaN across the row
      std::fill(row, row + c.s.M, std::numeric_limits<T>::quiet_NaN());
      return;
    }
    const T inv_total = T(1.0 / total);
    for (int64_t t = 0; t < c.s.M; ++t) row[t] *= inv_total;
  });
}

constexpr int64_t kSearchBatch = 8;  // draws whose block searches run in lockstep

// out[j] = index of the first of a[0 .. n) (ascending, n ≥ 1) that exceeds x[j], or n, for
// j < kSearchBatch. Branchless (random targets cost no mispredictions) and in lockstep (the
// iteration count depends on n only), so the searches' chains of dependent loads overlap.
inline void upper_bounds(const double* a, int64_t n, const double* x, int64_t* out) {
  int64_t first[kSearchBatch] = {};
  for (int64_t len = n; len > 1;) {
    const int64_t half = len / 2;
    for (int64_t j = 0; j < kSearchBatch; ++j) first[j] += a[first[j] + half - 1] <= x[j] ? half : 0;
    len -= half;  // the answer for x[j] lies in [first[j], first[j] + len]
  }
  for (int64_t j = 0; j < kSearchBatch; ++j) out[j] = first[j] + (a[first[j]] <= x[j]);
}

template <class T, int D>
void indices_impl(const Call<T, D>& c, const double* uniforms, int64_t* idx) {
  const SampleShape& s = c.s;
  const int64_t blocks = cdf_blocks(s.M);
  for_each_query<T>(c, nullptr, true, [&](int64_t b, int64_t q, T* row, Scratch<T>& w) {
    const int64_t bq = b * s.Q + q;
    const T mx = usable_row_max(row, s.M);
    if (mx != mx) {  // unusable: -1 for each draw
      std::fill(idx + bq * s.S, idx + (bq + 1) * s.S, int64_t(-1));
      return;
    }
    for (int64_t t = 0; t < s.M; ++t) row[t] = exp_nonpositive(row[t] - mx);  // vectorised; masked -> 0
    // The CDF in blocks of kCdfBlock entries: part[t] is the sum of t's block's weights up to t,
    // added in order from zero, and cdf[blk] = cdf[blk - 1] + part[the block's last entry]. The
    // blocks' sums are independent chains (a plain running sum is one chain of M dependent adds),
    // and the CDF at t is cdf[blk - 1] + part[t], computed the same way in the search below, so
    // at the block's last entry it is exactly cdf[blk].
    double* cdf = w.cdf.data();
    double* part = w.part.data();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      double local = 0;
      for (int64_t t = blk * kCdfBlock; t < std::min(s.M, (blk + 1) * kCdfBlock); ++t) part[t] = local += double(row[t]);
      cdf[blk] = local;
    }
    for (int64_t blk = 1; blk < blocks; ++blk) cdf[blk] += cdf[blk - 1];
    const double total = cdf[blocks - 1];  // ≥ 1: the largest weight is exp(0)
    // u < 1, but u * total may round up to total; the largest double below it still lands on
    // an entry of positive probability.
    const double top = std::nextafter(total, 0.0);
    for (int64_t i0 = 0; i0 < s.S; i0 += kSearchBatch) {
      const int64_t n = std::min(kSearchBatch, s.S - i0);
      double target[kSearchBatch];
      for (int64_t j = 0; j < kSearchBatch; ++j)
        target[j] = std::min(uniforms[bq * s.S + i0 + std::min(j, n - 1)] * total, top);
      int64_t blk[kSearchBatch];
      upper_bounds(cdf, blocks, target, blk);  // the first block whose CDF exceeds each target
      for (int64_t j = 0; j < n; ++j) {
        // the draw is the first entry of the block whose CDF exceeds the target: count those that
        // do not (the CDF rises within the block; the padding past M is +inf)
        const double base = blk[j] > 0 ? cdf[blk[j] - 1] : 0.0;
        const double* p = part + blk[j] * kCdfBlock;
        int64_t below = 0;
        for (int64_t u = 0; u < kCdfBlock; ++u) below += base + p[u] <= target[j];
        idx[bq * s.S + i0 + j] = blk[j] * kCdfBlock + below;
      }
    }
  });
}

}  // namespace

template <class T>
void conditional_probs_cpu(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                           View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, T* probs) {
  dispatch_dim(s.d, [&]<int D>() { probs_impl(make_call<T, D>(s, key, values, qloc, qvar, mloc, mvar), probs); });
}

template <class T>
void conditional_sample_indices_cpu(const SampleShape& s, View3<const T> key, View3<const T> values,
                                    View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                                    View3<const T> mvar, const double* uniforms, int64_t* idx) {
  dispatch_dim(s.d, [&]<int D>() {
    indices_impl(make_call<T, D>(s, key, values, qloc, qvar, mloc, mvar), uniforms, idx);
  });
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
