// matmul.h: the product of two activations (attention scores Q K^T, context P V), batched over
// heads (layer kind "matmul_act", qfx_onnx/hls/kinds.py; same text for every project).
#ifndef QFX_MATMUL_H_
#define QFX_MATMUL_H_

#include "ap_fixed.h"

namespace qfx {

// y[bi][m][n] = epilogue(sum_k a[a_base(bi) + m * n_inner + k] * b[b_base(bi) + k * n_cols + n]),
// bi < n_batch (the broadcast batch dims, flat), a and b row-major. accum_t holds every partial
// sum exactly (the lossless type of type propagation), so the order of the terms cannot matter.
// Both operands are variables: every product is a multiplier (no K-hot shift-adds).
template <class a_T, class b_T, class res_T, class CONFIG_T>
void matmul(const a_T a[CONFIG_T::n_a], const b_T b[CONFIG_T::n_b],
            res_T y[CONFIG_T::n_batch * CONFIG_T::n_rows * CONFIG_T::n_cols]) {
MatMulRows:
  for (int r = 0; r < CONFIG_T::n_batch * CONFIG_T::n_rows; r++) {
#pragma HLS PIPELINE II = CONFIG_T::reuse_factor
    const int bi = r / CONFIG_T::n_rows;
    const int a_row = CONFIG_T::a_base(bi) + (r % CONFIG_T::n_rows) * CONFIG_T::n_inner;
    const int b_mat = CONFIG_T::b_base(bi);
  MatMulCols:
    for (int n = 0; n < CONFIG_T::n_cols; n++) {
      typename CONFIG_T::accum_t acc = 0;
    MatMulProducts:
      for (int k = 0; k < CONFIG_T::n_inner; k++) {
#pragma HLS UNROLL factor = CONFIG_T::unroll_factor
        acc += a[a_row + k] * b[b_mat + k * CONFIG_T::n_cols + n];
      }
      const int o = r * CONFIG_T::n_cols + n;
      y[o] = CONFIG_T::epilogue(acc, o);
    }
  }
}

}  // namespace qfx

#endif
