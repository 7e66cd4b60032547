#pragma once
#include <cstdint>

#include "read_cpu.h"

namespace rk {

// The read as matrix products (csrc/read_dense_cpu.cpp) for calls whose variance is shared by every
// (query, entry) pair of a batch row: one number (ReadShape::uniform_var), or one per dimension
// (query and entry variances broadcast over their rows, stride 0, as a σ of shape (d,) gives).
// read_cpu.cpp sends such calls here when there are enough queries to fill enough of the vector lanes
// (dense_read_min_queries in read_dense_cpu.cpp).
template <class T>
bool dense_read_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar);

// Whether a dense call's scores come from the product form ‖q‖² + ‖m‖² − 2 q·m (many dimensions).
bool dense_read_product_scores(const ReadShape& s);

template <class T>
void dense_read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                            View3<const T> mvar, View3<const T> values, T* out, T* lse);

// The backward of such calls (csrc/read_dense_backward_cpu.cpp), its vector lanes over entries:
// taken when there are enough entries to fill them.
template <class T>
bool dense_read_backward_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar);

template <class T>
void dense_read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                             View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                             const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values);

}  // namespace rk
