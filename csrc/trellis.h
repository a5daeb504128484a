// Bitshift trellis codes (after QTIP, arXiv 2406.11235; our construction, see python/yaqa_ext/codebooks/trellis.py).
// A unit of T weights is coded by a stream of T + p k-bit symbols, p = (L - k) / k: weight t's L-bit state is
// the window of stream symbols t .. t + p read little-endian (symbol t + i at bits k i), so the state shifts right
// by k bits per weight and the new symbol enters at the top; its value is table[state] (2^L values). The nearest
// sequence is found exactly by the Viterbi algorithm over the 2^L states: the predecessors of state s are
// ((s mod J) << k) | q for the 2^k values of q (J = 2^(L - k)), shared by the 2^k states with the same s mod J.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace yaqa {

// Scratch memory of one Viterbi run: two cost rows of 2^L, the best-predecessor costs of 2^(L-k), the targets and
// weights across the wrap (tail-biting), and the predecessor choices of every step.
struct TrellisScratch {
  std::vector<float> cost, next, best, rotated;
  std::vector<uint8_t> back;
};

// Inlined into trellis_viterbi, which the CPU backend compiles per vector target (csrc/cpu/rounding.cpp).
#define YAQA_TRELLIS_INLINE inline __attribute__((always_inline))

// One step's best predecessors: best[j] = min_q cost[(j << k) | q] and its q (the first on ties).
template <int K>
YAQA_TRELLIS_INLINE void trellis_best_predecessors(const float* cost, int64_t J, float* best, uint8_t* back) {
  for (int64_t j = 0; j < J; ++j) {
    const float* c = cost + (j << K);
    float b = c[0];
    int arg = 0;
    for (int q = 1; q < (1 << K); ++q) {
      const bool lower = c[q] < b;
      b = lower ? c[q] : b;
      arg = lower ? q : arg;
    }
    best[j] = b;
    back[j] = static_cast<uint8_t>(arg);
  }
}

template <int K>
struct TrellisScalarBest {
  YAQA_TRELLIS_INLINE void operator()(const float* cost, int64_t J, float* best, uint8_t* back) const {
    trellis_best_predecessors<K>(cost, J, best, back);
  }
};

// The forward pass of the search: s.cost ends holding each final state's least cost sum_t w[t] (y[t] -
// table[state_t])^2 and s.back each step's best predecessors. start_low >= 0: only states whose low L - k bits equal
// it may start (the others cost +inf). Best: how each step's best predecessors are found (trellis_best_predecessors,
// or a vectorised equal of it).
template <int K, class Best>
YAQA_TRELLIS_INLINE void trellis_forward(const float* y, const float* w, int64_t T, int64_t L, const float* table,
                                         TrellisScratch& s, Best best_of, int64_t start_low) {
  constexpr int64_t Q = int64_t{1} << K;
  const int64_t S = int64_t{1} << L, J = S >> K;
  s.cost.resize(S), s.next.resize(S), s.best.resize(J), s.back.resize(static_cast<size_t>(T * J));
  for (int64_t st = 0; st < S; ++st) {
    const float d = y[0] - table[st];
    s.cost[st] = start_low < 0 || (st & (J - 1)) == start_low ? w[0] * (d * d) : INFINITY;
  }
  for (int64_t t = 1; t < T; ++t) {
    best_of(s.cost.data(), J, s.best.data(), s.back.data() + t * J);
    const float yt = y[t], wt = w[t];
    const float* best = s.best.data();
    for (int64_t q = 0; q < Q; ++q) {  // the states with new symbol q: q J + j, contiguous in j
      float* next = s.next.data() + q * J;
      const float* v = table + q * J;
      for (int64_t j = 0; j < J; ++j) {
        const float d = yt - v[j];
        next[j] = best[j] + wt * (d * d);
      }
    }
    std::swap(s.cost, s.next);
  }
}

// The state before `state` at step t > 0 of a forward pass whose choices are back (T x J).
C10_HOST_DEVICE inline int64_t trellis_previous(const uint8_t* back, int64_t state, int64_t t, int64_t J, int64_t k) {
  const int64_t j = state & (J - 1);
  return (j << k) | back[t * J + j];
}

// The first state of least cost among cost[begin .. end).
C10_HOST_DEVICE inline int64_t trellis_first_least(const float* cost, int64_t begin, int64_t end) {
  int64_t state = begin;
  for (int64_t st = begin + 1; st < end; ++st) {
    if (cost[st] < cost[state]) state = st;
  }
  return state;
}

// The stream of the path ending in `state` after T steps with choices back: weight t's new symbol (stream index
// t + p) is its state's top k bits; the first state holds stream symbols 0 .. p.
C10_HOST_DEVICE inline void trellis_write_stream(const uint8_t* back, int64_t state, int64_t T, int64_t L, int64_t k,
                                                 uint8_t* symbols) {
  const int64_t J = (int64_t{1} << L) >> k, p = (L - k) / k;
  for (int64_t t = T - 1; t > 0; --t) {
    symbols[p + t] = static_cast<uint8_t>(state >> (L - k));
    state = trellis_previous(back, state, t, J, k);
  }
  for (int64_t i = 0; i <= p; ++i) symbols[i] = static_cast<uint8_t>((state >> (k * i)) & ((int64_t{1} << k) - 1));
}

// Tail-biting searches take the bits the two ends share from the best path over this many weights around the wrap
// (the last half of them, then the first half).
constexpr int64_t kTrellisWrapWindow = 64;

// The stream (T + p symbols, each < 2^k) of least weighted squared error sum_t w[t] (y[t] - table[state_t])^2 for
// targets y (T), weights w > 0. Tail-biting (T >= kTrellisWrapWindow): the stream's last p symbols must repeat its
// first p (the last state's top L - k bits are the first state's low ones), so that storing T symbols is enough.
// As in QTIP (which rotates the whole unit by T / 2), the shared bits are weight 0's in the best unconstrained path
// across the wrap (weights T - 32 .. T - 1, 0 .. 31), and the search then runs with both ends held to them.
template <int K, class Best = TrellisScalarBest<K>>
YAQA_TRELLIS_INLINE void trellis_viterbi_k(const float* y, const float* w, int64_t T, int64_t L, const float* table,
                                           TrellisScratch& s, uint8_t* symbols, bool tail_biting, Best best_of = {}) {
  constexpr int64_t Q = int64_t{1} << K;
  const int64_t S = int64_t{1} << L, J = S >> K;
  int64_t overlap = -1;
  if (tail_biting) {
    constexpr int64_t N = kTrellisWrapWindow, h = N / 2;
    s.rotated.resize(2 * N);
    for (int64_t t = 0; t < N; ++t) s.rotated[t] = y[(t + T - h) % T], s.rotated[N + t] = w[(t + T - h) % T];
    trellis_forward<K>(s.rotated.data(), s.rotated.data() + N, N, L, table, s, best_of, -1);
    int64_t state = trellis_first_least(s.cost.data(), 0, S);
    for (int64_t t = N - 1; t > h; --t) state = trellis_previous(s.back.data(), state, t, J, K);
    overlap = state & (J - 1);  // the state of weight 0 in the path across the wrap
  }
  trellis_forward<K>(y, w, T, L, table, s, best_of, overlap);
  // The last state: any, or one whose top L - k bits are the overlap ((overlap << k) | q).
  const int64_t state = overlap < 0 ? trellis_first_least(s.cost.data(), 0, S)
                                    : trellis_first_least(s.cost.data(), overlap << K, (overlap << K) + Q);
  trellis_write_stream(s.back.data(), state, T, L, K, symbols);
}

// trellis_viterbi_k for k = bits (1 to 4); defined in csrc/cpu/rounding.cpp.
void trellis_viterbi(const float* y, const float* w, int64_t T, int64_t L, int64_t k, const float* table,
                     TrellisScratch& s, uint8_t* symbols, bool tail_biting);

// The state of weight t from a unit's symbols: stream symbols t .. t + p, little-endian.
C10_HOST_DEVICE inline int64_t trellis_state(const uint8_t* symbols, int64_t t, int64_t p, int64_t k) {
  int64_t state = 0;
  for (int64_t i = p; i >= 0; --i) state = (state << k) | symbols[t + i];
  return state;
}

// The L of a trellis state table (2^L float32 values, L a multiple of bits above it, at most 20).
inline int64_t check_trellis_table(const at::Tensor& table, const at::Tensor& like, int64_t bits, const char* op) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, op, ": table must be float32, got ", table.scalar_type());
  const int64_t size = table.dim() == 1 ? table.size(0) : 0;
  int64_t L = 0;
  while (L < 20 && (int64_t{1} << L) < size) ++L;
  TORCH_CHECK_VALUE(size > 0 && (int64_t{1} << L) == size && L > bits && L % bits == 0, op,
                    ": table must hold 2^L state values, L <= 20 a multiple of bits (", bits, ") above it, got shape ",
                    table.sizes());
  check_same_device(like, table, op, "W or x", "table");
  return L;
}

}  // namespace yaqa
