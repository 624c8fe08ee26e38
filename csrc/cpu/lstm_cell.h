// One time step of many LSTM rows at once (G groups x B rows), the pointwise half of the CPU
// grouped masked LSTM (the matmuls stay in PyTorch's BLAS). Framework-free (see DESIGN.md).
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// Row (g, b) is active at step `step` iff step < lengths[g * B + b]. pre: (G, B, 4H) contiguous
// pre-activations (gate order i, f, g, o). For an active row: c = f*c + i*g, h = o*tanh(c), written to
// h_state/c_state (contiguous (G, B, H)) and to the step's slices hs, cells ((G, B, H) with group
// stride *_sg, rows H apart) and gates ((G, B, 4H), activated). An inactive row keeps its state,
// writes hs = 0, gates = 0 and cells = its carried c.
template <typename T>
void lstm_cell_forward(int64_t G, int64_t B, int64_t H, int64_t step, const T* pre, const int64_t* lengths,
                       T* h_state, T* c_state, T* hs, int64_t hs_sg, T* gates, int64_t gates_sg,
                       T* cells, int64_t cells_sg);

// Backward of the step for active rows, from the saved activated gates, this step's cell state and
// the previous one (c_prev: (G, B, H) slice with group stride c_prev_sg): dh_tot = dhs + dh,
// dgates = gradient w.r.t. the pre-activations, dc <- dc_tot * f. Inactive rows: dgates = 0, dc kept.
// dh and dc are contiguous (G, B, H); the caller forms the next dh = dgates @ W_hh.
template <typename T>
void lstm_cell_backward(int64_t G, int64_t B, int64_t H, int64_t step, const int64_t* lengths,
                        const T* gates, int64_t gates_sg, const T* cells, int64_t cells_sg,
                        const T* c_prev, int64_t c_prev_sg, const T* dhs, int64_t dhs_sg,
                        const T* dh, T* dc, T* dgates, int64_t dgates_sg);

}  // namespace cpu
}  // namespace mtlfast
