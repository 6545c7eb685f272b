// Templates instantiated by the translation units that tests/test_ap_fixed_headers.py generates.
// Each generated unit lists concrete types; this header says what is done with them.
#ifndef QFX_APFIXED_CHECK_H
#define QFX_APFIXED_CHECK_H

#include <ap_fixed.h>
#include <ap_int.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>
#include <utility>

// Casts n doubles to T (the way `T v = x;` does in HLS C code) and stores each raw W-bit pattern.
typedef void (*CastFn)(const double* in, size_t n, uint64_t* out);

template <class T, int W>
void cast_loop(const double* in, size_t n, uint64_t* out) {
  for (size_t k = 0; k < n; ++k) {
    T v = in[k];
    out[k] = v.range(W - 1, 0).to_uint64();
  }
}

inline const char* q_name(ap_q_mode q) {
  switch (q) {
    case AP_RND: return "AP_RND";
    case AP_RND_ZERO: return "AP_RND_ZERO";
    case AP_RND_MIN_INF: return "AP_RND_MIN_INF";
    case AP_RND_INF: return "AP_RND_INF";
    case AP_RND_CONV: return "AP_RND_CONV";
    case AP_TRN: return "AP_TRN";
    case AP_TRN_ZERO: return "AP_TRN_ZERO";
  }
  return "?";
}

inline const char* o_name(ap_o_mode o) {
  switch (o) {
    case AP_SAT: return "AP_SAT";
    case AP_SAT_ZERO: return "AP_SAT_ZERO";
    case AP_SAT_SYM: return "AP_SAT_SYM";
    case AP_WRAP: return "AP_WRAP";
    case AP_WRAP_SM: return "AP_WRAP_SM";
  }
  return "?";
}

// Prints "tag W I signed Q O N kind" for a type, read from the template parameters of its base
// class, so that arithmetic result types (decltype(a + b) ...) can be compared with qfx_onnx's.
template <int W, int I, bool S, ap_q_mode Q, ap_o_mode O, int N>
void show_type(const char* tag, const ap_fixed_base<W, I, S, Q, O, N>*) {
  printf("%s %d %d %d %s %s %d fixed\n", tag, W, I, (int)S, q_name(Q), o_name(O), N);
}
template <int W, bool S>
void show_type(const char* tag, const ap_int_base<W, S>*) {
  printf("%s %d %d %d AP_TRN AP_WRAP 0 int\n", tag, W, W, (int)S);
}
// QFX_SHOW("add 3", std::declval<A>() + std::declval<B>()) prints the type of an unevaluated
// expression.
#define QFX_SHOW(tag, ...) \
  show_type(tag, (typename std::decay<decltype(__VA_ARGS__)>::type*)0)

// Sets x to the smallest (want_max false) or largest code of its W-bit type, bit by bit, so it
// works at any width.
template <class T>
void set_extreme(T& x, int w, bool is_signed, bool want_max) {
  for (int i = 0; i < w; ++i) {
    bool top = i == w - 1;
    x[i] = want_max ? !(is_signed && top) : (is_signed && top);
  }
}

// Adds `terms` copies of an extreme P value into an A accumulator (A's own += operator, the way a
// generated dense layer accumulates), then prints "tag <A bits, MSB first>".
template <class P, class A>
void accumulate_extreme(const char* tag, int wp, bool sp, int wa, bool want_max, int terms) {
  P p;
  set_extreme(p, wp, sp, want_max);
  A acc = 0;
  for (int k = 0; k < terms; ++k) acc += p;
  printf("%s ", tag);
  for (int i = wa - 1; i >= 0; --i) putchar(acc[i] ? '1' : '0');
  putchar('\n');
}

// Prints "tag <T(x).to_string(10)>".
template <class T>
void print_to_string(const char* tag, double x) {
  T v = x;
  printf("%s %s\n", tag, v.to_string(10).c_str());
}

#endif  // QFX_APFIXED_CHECK_H
