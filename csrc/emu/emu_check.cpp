// csrc/emu/emu_check.cpp — runs the csrc/ kernels under the CPU emulator (cuda_runtime.h here) with
// AddressSanitizer + UBSan, on exact-size buffers (posix_memalign of exactly the bytes used, so one element past
// the end is caught) and on views shifted by one element (so the host must pick narrower vectors; a misaligned
// vector access is a UBSan error). Results are checked against a float64 reference computed here. Prints one line
// per failure and a summary; exit status 0 only when every check passed.
//
// Built and run by emu_build.py --check (tests/test_csrc.py). Sizes are small: every CUDA thread is an OS thread.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "moe_ops.h"

extern "C" long long moe_emu_launches();

namespace {

int failures = 0;
int checks = 0;

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.9g", v);
  return b;
}

void fail(const std::string& what) {
  ++failures;
  std::printf("FAIL %s\n", what.c_str());
}

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) fail(what);
}

// ---- element types -------------------------------------------------------------------------------------------
double to_d(float v) { return v; }
double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); }
double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v);
template <> float from_d<float>(double v) { return float(v); }
template <> double from_d<double>(double v) { return v; }
template <> __half from_d<__half>(double v) { return __float2half_rn(float(v)); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }

// tiny: the smallest subnormal step, the absolute error of rounding a result that lands in the subnormal range.
template <typename T> struct Info;
template <> struct Info<float> { static constexpr int code = MOE_FP32; static constexpr double eps = 6e-8; static constexpr double acc = 6e-8; static constexpr double tiny = 1.5e-45; static constexpr const char* name = "fp32"; };
template <> struct Info<__half> { static constexpr int code = MOE_FP16; static constexpr double eps = 4.9e-4; static constexpr double acc = 6e-8; static constexpr double tiny = 6e-8; static constexpr const char* name = "fp16"; };
template <> struct Info<__nv_bfloat16> { static constexpr int code = MOE_BF16; static constexpr double eps = 3.9e-3; static constexpr double acc = 6e-8; static constexpr double tiny = 9.2e-41; static constexpr const char* name = "bf16"; };
template <> struct Info<double> { static constexpr int code = MOE_FP64; static constexpr double eps = 1.2e-16; static constexpr double acc = 1.2e-16; static constexpr double tiny = 4.9e-324; static constexpr const char* name = "fp64"; };

// A buffer of exactly `count` elements starting `shift` elements past a 256-byte boundary: reading or writing one
// element past either end is an ASan error, and shift != 0 breaks 16-byte alignment.
template <typename E>
struct Buf {
  Buf(size_t count, int shift) : n(count) {
    const size_t bytes = (count + size_t(shift)) * sizeof(E);
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) != 0) std::abort();
    base = static_cast<unsigned char*>(p);
    data = reinterpret_cast<E*>(base) + shift;
  }
  ~Buf() { std::free(base); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  E* ptr() { return n == 0 ? nullptr : data; }
  E& operator[](size_t i) { return data[i]; }
  size_t n;
  unsigned char* base;
  E* data;
};

std::mt19937_64 rng(1234);
double uniform() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); }

bool close(double got, double ref, double tol) { return std::isfinite(got) && std::fabs(got - ref) <= tol; }

struct Routing {  // T tokens with 0..kmax pairs each (pairs in token order); row_of_pair: a random permutation
  int64_t T, N;
  std::vector<int64_t> offsets, token, row_of_pair;
};

Routing make_routing(int64_t T, int kmax, bool allow_empty) {
  Routing r;
  r.T = T;
  r.offsets.push_back(0);
  for (int64_t t = 0; t < T; ++t) {
    int k = int(std::uniform_int_distribution<int>(allow_empty ? 0 : 1, kmax)(rng));
    for (int j = 0; j < k; ++j) r.token.push_back(t);
    r.offsets.push_back(r.offsets.back() + k);
  }
  r.N = r.offsets.back();
  r.row_of_pair.resize(size_t(r.N));
  for (int64_t p = 0; p < r.N; ++p) r.row_of_pair[size_t(p)] = p;
  std::shuffle(r.row_of_pair.begin(), r.row_of_pair.end(), rng);
  return r;
}

template <typename E>
void fill_index(Buf<E>& b, const std::vector<E>& v) {
  for (size_t i = 0; i < v.size(); ++i) b[i] = v[i];
}

// ---- one (dtype, D, shift) case for all three functions --------------------------------------------------------
template <typename E>
void run_case(int64_t D, int shift, int64_t T_, int kmax, bool allow_empty) {
  using W = typename std::conditional<std::is_same<E, double>::value, double, float>::type;
  const std::string tag = std::string(Info<E>::name) + " D=" + std::to_string(D) + " shift=" + std::to_string(shift) +
                          " T=" + std::to_string(T_) + " kmax=" + std::to_string(kmax);
  const Routing r = make_routing(T_, kmax, allow_empty);
  const int64_t N = r.N, T = r.T;
  const int code = Info<E>::code;

  // permute: out[n] = x[src_token[n]], src_token = the token of each expert-sorted row (any values in [0, T))
  {
    Buf<E> x(size_t(T * D), shift), out(size_t(N * D), shift);
    Buf<int64_t> src_token(size_t(N), 0);
    for (int64_t i = 0; i < T * D; ++i) x[size_t(i)] = from_d<E>(uniform());
    for (int64_t n = 0; n < N; ++n) src_token[size_t(n)] = r.token[size_t(r.row_of_pair[size_t(n)])];
    const int st = moe_permute_fwd(x.ptr(), src_token.ptr(), out.ptr(), N, D, code, nullptr);
    expect(st == 0, tag + " permute status " + std::to_string(st));
    bool ok = true;
    for (int64_t n = 0; n < N && ok; ++n)
      ok = std::memcmp(&out[size_t(n * D)], &x[size_t(src_token[size_t(n)] * D)], size_t(D) * sizeof(E)) == 0;
    expect(ok, tag + " permute values");
  }

  // combine forward, with weights and with weight = NULL
  Buf<E> h(size_t(N * D), shift), y(size_t(T * D), shift), dy(size_t(T * D), shift), dh(size_t(N * D), shift);
  Buf<W> w(size_t(N), 0), dw(size_t(N), 0);
  Buf<int64_t> row_of_pair(size_t(N), 0), tok(size_t(N), 0), offs(size_t(T + 1), 0);
  fill_index(row_of_pair, r.row_of_pair);
  fill_index(tok, r.token);
  fill_index(offs, r.offsets);
  for (int64_t i = 0; i < N * D; ++i) h[size_t(i)] = from_d<E>(uniform());
  for (int64_t i = 0; i < T * D; ++i) dy[size_t(i)] = from_d<E>(uniform());
  for (int64_t p = 0; p < N; ++p) w[size_t(p)] = W(uniform());
  for (int weighted = 0; weighted < 2; ++weighted) {
    for (int64_t i = 0; i < T * D; ++i) y[size_t(i)] = from_d<E>(1e30);  // poison: every element must be written
    const int st = moe_combine_fwd(h.ptr(), weighted ? w.ptr() : nullptr, row_of_pair.ptr(), offs.ptr(), y.ptr(), T, D,
                                   code, nullptr);
    expect(st == 0, tag + " combine_fwd status " + std::to_string(st));
    bool ok = true;
    for (int64_t t = 0; t < T && ok; ++t)
      for (int64_t d = 0; d < D && ok; ++d) {
        double ref = 0, mag = 0;
        for (int64_t p = r.offsets[size_t(t)]; p < r.offsets[size_t(t + 1)]; ++p) {
          const double hv = to_d(h[size_t(r.row_of_pair[size_t(p)] * D + d)]);
          const double term = (weighted ? double(w[size_t(p)]) : 1.0) * hv;
          ref += term;
          mag += std::fabs(term);
        }
        const double got = to_d(y[size_t(t * D + d)]);
        ok = close(got, ref, Info<E>::eps * std::fabs(ref) + 4 * Info<E>::acc * mag + Info<E>::tiny);
        if (!ok) fail(tag + " combine_fwd y[" + std::to_string(t) + "," + std::to_string(d) + "] = " +
                      fmt(got) + " want " + fmt(ref));
      }
    expect(ok, tag + (weighted ? " combine_fwd weighted" : " combine_fwd unweighted"));
  }

  // combine backward, with d_weight and without
  for (int with_dw = 1; with_dw >= 0; --with_dw) {
    for (int64_t i = 0; i < N * D; ++i) dh[size_t(i)] = from_d<E>(1e30);
    for (int64_t p = 0; p < N; ++p) dw[size_t(p)] = W(1e30);
    const int st = moe_combine_bwd(dy.ptr(), with_dw ? h.ptr() : nullptr, w.ptr(), row_of_pair.ptr(), tok.ptr(),
                                   dh.ptr(), with_dw ? dw.ptr() : nullptr, N, D, code, nullptr);
    expect(st == 0, tag + " combine_bwd status " + std::to_string(st));
    bool ok = true;
    for (int64_t p = 0; p < N && ok; ++p) {
      const int64_t rr = r.row_of_pair[size_t(p)], t = r.token[size_t(p)];
      double dot = 0, mag = 0;
      for (int64_t d = 0; d < D && ok; ++d) {
        const double g = to_d(dy[size_t(t * D + d)]);
        const double ref = double(w[size_t(p)]) * g;
        const double got = to_d(dh[size_t(rr * D + d)]);
        ok = close(got, ref, Info<E>::eps * std::fabs(ref) + 2 * Info<E>::acc * std::fabs(ref) + Info<E>::tiny);
        if (!ok) fail(tag + " combine_bwd d_h[" + std::to_string(rr) + "," + std::to_string(d) + "] = " +
                      fmt(got) + " want " + fmt(ref));
        dot += g * to_d(h[size_t(rr * D + d)]);
        mag += std::fabs(g * to_d(h[size_t(rr * D + d)]));
      }
      if (with_dw && ok) {
        const double got = double(dw[size_t(p)]);
        ok = close(got, dot, 4 * Info<E>::acc * (mag + std::fabs(dot)) * double(D + 1) + Info<E>::tiny);
        if (!ok) fail(tag + " combine_bwd d_w[" + std::to_string(p) + "] = " + fmt(got) + " want " +
                      fmt(dot));
      }
      if (!with_dw && ok) ok = dw[size_t(p)] == W(1e30);  // d_weight NULL: untouched
    }
    expect(ok, tag + (with_dw ? " combine_bwd with d_w" : " combine_bwd without d_w"));
  }
}

void abi_edges() {
  int64_t idx[2] = {0, 0};
  float buf[8] = {0};
  long long before = moe_emu_launches();
  expect(moe_permute_fwd(nullptr, nullptr, nullptr, 0, 4, MOE_FP32, nullptr) == 0, "permute N=0 ok");
  expect(moe_permute_fwd(nullptr, nullptr, nullptr, 3, 0, MOE_FP32, nullptr) == 0, "permute D=0 ok");
  expect(moe_combine_fwd(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, MOE_FP32, nullptr) == 0, "combine T=0");
  expect(moe_combine_bwd(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, MOE_FP32, nullptr) == 0,
         "combine_bwd N=0");
  expect(moe_emu_launches() == before, "empty work launches nothing");
  const int bad = int(cudaErrorInvalidValue);
  expect(moe_permute_fwd(buf, idx, buf, 1, 1, 7, nullptr) == bad, "permute bad dtype");
  expect(moe_permute_fwd(buf, idx, buf, -1, 1, MOE_FP32, nullptr) == bad, "permute negative N");
  expect(moe_permute_fwd(nullptr, idx, buf, 1, 1, MOE_FP32, nullptr) == bad, "permute null x");
  expect(moe_combine_fwd(buf, nullptr, idx, idx, buf, 1, 1, -1, nullptr) == bad, "combine bad dtype");
  expect(moe_combine_fwd(buf, nullptr, idx, idx, buf, 0, 1, 9, nullptr) == bad, "combine bad dtype, T=0");
  expect(moe_combine_fwd(buf, nullptr, idx, nullptr, buf, 1, 1, MOE_FP32, nullptr) == bad, "combine null offsets");
  expect(moe_combine_bwd(buf, buf, nullptr, idx, idx, buf, buf, 1, 1, 4, nullptr) == bad, "combine_bwd bad dtype");
  expect(moe_combine_bwd(buf, nullptr, nullptr, idx, idx, buf, buf, 1, 1, MOE_FP32, nullptr) == bad,
         "combine_bwd d_weight without h");
  expect(moe_emu_launches() == before, "rejected calls launch nothing");

  // token with no pairs: y row is written as zeros, h and row_of_pair never read (may be NULL)
  float y[6];
  for (float& v : y) v = 1e30f;
  int64_t offs[3] = {0, 0, 0};
  expect(moe_combine_fwd(nullptr, nullptr, nullptr, offs, y, 2, 3, MOE_FP32, nullptr) == 0, "combine no pairs ok");
  bool zeros = true;
  for (float v : y) zeros = zeros && v == 0.0f;
  expect(zeros, "combine no pairs writes zeros");

  // D = 0 backward: d_weight zeroed without a launch
  float dw[3] = {5, 5, 5};
  before = moe_emu_launches();
  expect(moe_combine_bwd(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, dw, 3, 0, MOE_FP32, nullptr) == 0,
         "combine_bwd D=0 ok");
  expect(dw[0] == 0 && dw[1] == 0 && dw[2] == 0 && moe_emu_launches() == before, "combine_bwd D=0 zeroes d_weight");
}

// ---- expert counts: counts, exclusive offsets, stable order vs a host loop ---------------------------------------
void counts_case(int64_t N, int64_t E, int64_t used, int bad) {
  const std::string tag = "counts N=" + std::to_string(N) + " E=" + std::to_string(E) + " used=" +
                          std::to_string(used) + " bad=" + std::to_string(bad);
  std::vector<int64_t> ex(static_cast<size_t>(N));
  for (auto& v : ex) v = std::uniform_int_distribution<int64_t>(0, used - 1)(rng);
  for (int i = 0; i < bad && N > 0; ++i)
    ex[size_t(std::uniform_int_distribution<int64_t>(0, N - 1)(rng))] = i % 2 ? E : -1;
  Buf<int64_t> expert(size_t(N), 0), counts(size_t(E), 0), offsets(size_t(E + 1), 0), pair_of_row(size_t(N), 0);
  fill_index(expert, ex);
  for (int64_t e = 0; e < E; ++e) counts[size_t(e)] = -7;
  for (int64_t e = 0; e <= E; ++e) offsets[size_t(e)] = -7;
  for (int64_t p = 0; p < N; ++p) pair_of_row[size_t(p)] = -7;
  const int64_t ws = moe_expert_counts_workspace(N, E);
  expect(ws >= 0, tag + " workspace size");
  Buf<unsigned char> work(size_t(ws), 0);
  const int st = moe_expert_counts(expert.ptr(), N, E, counts.ptr(), offsets.ptr(), pair_of_row.ptr(), work.ptr(),
                                nullptr);
  expect(st == 0, tag + " status " + std::to_string(st));
  std::vector<int64_t> ref_order;
  bool ok = true;
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    ok = ok && offsets[size_t(e)] == run;
    int64_t c = 0;
    for (int64_t p = 0; p < N; ++p)
      if (ex[size_t(p)] == e) {
        ref_order.push_back(p);
        ++c;
      }
    ok = ok && counts[size_t(e)] == c;
    run += c;
  }
  ok = ok && offsets[size_t(E)] == run;
  expect(ok, tag + " counts and offsets");
  ok = true;
  for (size_t i = 0; i < ref_order.size(); ++i) ok = ok && pair_of_row[i] == ref_order[i];
  for (int64_t p = int64_t(ref_order.size()); p < N; ++p) ok = ok && pair_of_row[size_t(p)] == -7;  // skipped ids
  expect(ok, tag + " stable order");
}

void counts_edges() {
  int64_t c[3] = {5, 5, 5}, o[4] = {5, 5, 5, 5}, idx[1] = {0};
  const long long before = moe_emu_launches();
  expect(moe_expert_counts(nullptr, 0, 3, c, o, nullptr, nullptr, nullptr) == 0, "counts N=0 ok");
  expect(c[0] == 0 && c[2] == 0 && o[0] == 0 && o[3] == 0, "counts N=0 zeroes counts and offsets");
  const int bad = int(cudaErrorInvalidValue);
  expect(moe_expert_counts(idx, 1, 0, c, o, idx, c, nullptr) == bad, "counts E=0");
  expect(moe_expert_counts(idx, -1, 3, c, o, idx, c, nullptr) == bad, "counts N<0");
  expect(moe_expert_counts(idx, 1, 3, nullptr, o, idx, c, nullptr) == bad, "counts null counts");
  expect(moe_expert_counts(idx, 1, 3, c, o, idx, nullptr, nullptr) == bad, "counts null workspace");
  expect(moe_expert_counts_workspace(-1, 3) == -1 && moe_expert_counts_workspace(4, 0) == -1, "workspace bad args");
  expect(moe_emu_launches() == before, "counts: empty or rejected calls launch nothing");
}

// ---- fused top-k softmax vs a float64 host reference ---------------------------------------------------------
bool ranks_before_d(double a, int64_t ai, double b, int64_t bi) {
  const bool an = std::isnan(a), bn = std::isnan(b);
  if (an || bn) return an && (!bn || ai < bi);
  return a > b || (a == b && ai < bi);
}

template <typename E_>
void topk_case(int64_t T, int64_t E, int64_t K, int sf, int norm) {
  using W = typename std::conditional<std::is_same<E_, double>::value, double, float>::type;
  const std::string tag = std::string("topk ") + Info<E_>::name + " T=" + std::to_string(T) + " E=" +
                          std::to_string(E) + " K=" + std::to_string(K) + " sf=" + std::to_string(sf) +
                          " norm=" + std::to_string(norm);
  const double nan = std::nan(""), inf = INFINITY;
  Buf<E_> logits(size_t(T * E), 0);
  Buf<W> w(size_t(T * K), 0);
  Buf<int64_t> ids(size_t(T * K), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double v = 3 * uniform();
      if (t == 0) v = nan;                          // all NaN
      if (t == 1 && e % 3 == 1) v = nan;            // some NaN
      if (t == 2) v = -inf;                         // all -inf
      if (t == 3) v = double(e % 2);                // ties
      if (t == 4 && e % 4 == 2) v = inf;            // +inf entries
      if (t == 5 && e > 0) v = -inf;                // one finite entry, the rest -inf
      logits[size_t(t * E + e)] = from_d<E_>(v);
    }
  for (int64_t i = 0; i < T * K; ++i) {
    w[size_t(i)] = W(1e30);
    ids[size_t(i)] = -7;
  }
  const int st = moe_topk_softmax_fwd(logits.ptr(), w.ptr(), ids.ptr(), T, E, K, sf, norm, Info<E_>::code, nullptr);
  expect(st == 0, tag + " status " + std::to_string(st));
  const double tol = std::is_same<W, double>::value ? 1e-13 : 2e-6;
  bool ok = true;
  for (int64_t t = 0; t < T && ok; ++t) {
    std::vector<double> x(static_cast<size_t>(E));
    std::vector<int64_t> order(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      x[size_t(e)] = to_d(logits[size_t(t * E + e)]);
      order[size_t(e)] = e;
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return ranks_before_d(x[size_t(a)], a, x[size_t(b)], b); });
    const bool full = sf && !norm;
    const double top = x[size_t(order[0])];
    double den = 0;
    bool any_nan = std::isnan(top) || std::isinf(top);  // inf - inf: NaN, as torch's softmax
    for (int64_t i = 0; i < (full ? E : K); ++i) den += std::exp(x[size_t(full ? i : order[size_t(i)])] - top);
    for (int64_t j = 0; j < K && ok; ++j) {
      const int64_t got_i = ids[size_t(t * K + j)];
      const double got_w = double(w[size_t(t * K + j)]);
      ok = got_i == order[size_t(j)];
      if (!ok) fail(tag + " id[" + std::to_string(t) + "," + std::to_string(j) + "] = " + std::to_string(got_i) +
                    " want " + std::to_string(order[size_t(j)]));
      const double ref_w = std::exp(x[size_t(got_i < 0 || got_i >= E ? 0 : got_i)] - top) / den;
      if (ok) ok = any_nan ? std::isnan(got_w) : close(got_w, ref_w, tol);
      if (!ok) fail(tag + " w[" + std::to_string(t) + "," + std::to_string(j) + "] = " + fmt(got_w) + " want " +
                    (any_nan ? std::string("nan") : fmt(ref_w)));
    }
  }
  expect(ok, tag + " values");
}

void topk_edges() {
  float l[4] = {0, 1, 2, 3}, w[4];
  int64_t i[4];
  const long long before = moe_emu_launches();
  const int bad = int(cudaErrorInvalidValue);
  expect(moe_topk_softmax_fwd(nullptr, nullptr, nullptr, 0, 4, 2, 0, 0, MOE_FP32, nullptr) == 0, "topk T=0 ok");
  expect(moe_topk_softmax_fwd(l, w, i, 1, 4, 0, 0, 0, MOE_FP32, nullptr) == bad, "topk K=0");
  expect(moe_topk_softmax_fwd(l, w, i, 1, 4, 5, 0, 0, MOE_FP32, nullptr) == bad, "topk K>E");
  expect(moe_topk_softmax_fwd(l, w, i, 1, 0, 1, 0, 0, MOE_FP32, nullptr) == bad, "topk E=0");
  expect(moe_topk_softmax_fwd(nullptr, w, i, 1, 4, 1, 0, 0, MOE_FP32, nullptr) == bad, "topk null logits");
  expect(moe_topk_softmax_fwd(l, w, i, 1, 4, 1, 0, 0, 7, nullptr) == bad, "topk bad dtype");
  expect(moe_emu_launches() == before, "topk: empty or rejected calls launch nothing");
}

}  // namespace

int main() {
  counts_edges();
  topk_edges();
  // counts: one pair; a block boundary (255/256/257); many experts with zero pairs; ids outside [0, E) skipped;
  // several blocks of one expert
  counts_case(1, 1, 1, 0);
  counts_case(255, 3, 2, 0);
  counts_case(256, 64, 20, 0);
  counts_case(257, 8, 8, 0);
  counts_case(1000, 300, 150, 6);
  counts_case(600, 1, 1, 0);
  // top-k: E below / above a warp (lanes with no or several experts), K = 1, 3, E; seven rows of which six are
  // special (NaN, -inf, ties, +inf) and one more than a block's four tokens
  for (int64_t E : {1, 5, 33, 70})
    for (int64_t K : {int64_t(1), std::min<int64_t>(3, E), E})
      for (int mode = 0; mode < 3; ++mode) {
        const int sf = mode > 0, norm = mode == 2;
        topk_case<float>(7, E, K, sf, norm);
        if (K != 1) continue;
        topk_case<__half>(7, E, K, sf, norm);
        topk_case<__nv_bfloat16>(7, E, K, sf, norm);
        topk_case<double>(7, E, K, sf, norm);
      }
  topk_case<double>(9, 37, 4, 0, 0);
  topk_case<__nv_bfloat16>(5, 64, 8, 1, 0);
  topk_case<__half>(6, 12, 5, 1, 1);

  abi_edges();
  // D covers: 1 (scalar), 3/5 (odd), 4/8/16 (every vector width), 36, 130 (2 mod 8), 520 (> 256 threads' worth of
  // vectors for fp64, several rows per block for the others), 1030 (> 256 packs at VEC 2). shift 1 = misaligned view.
  const int64_t Ds[] = {1, 3, 4, 5, 8, 16, 36, 130, 520, 1030};
  for (int64_t D : Ds)
    for (int shift = 0; shift < 2; ++shift) {
      run_case<float>(D, shift, 5, 3, true);
      run_case<__half>(D, shift, 5, 3, true);
      run_case<__nv_bfloat16>(D, shift, 5, 3, true);
      run_case<double>(D, shift, 5, 3, true);
    }
  run_case<float>(8, 0, 1, 1, false);    // T = 1, k = 1
  run_case<float>(24, 0, 1, 8, false);   // T = 1, several pairs
  run_case<__half>(8, 0, 40, 2, true);   // more tokens than one block's rows (fwd block = [32 x 8] here)
  run_case<float>(2, 0, 300, 1, false);  // 300 tokens at D = 2: several forward blocks
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
