// The recurrent half of the CPU grouped masked LSTM: every time step of G groups x B rows in one
// call, the recurrent matmul and the cell fused (the input projection and the weight gradients
// are large GEMMs and stay in PyTorch's BLAS). Framework-free (see DESIGN.md).
//
// Layouts, all contiguous and in time order: xproj, gates, dgates (G, T, B, 4H); hs, dhs, cells,
// h_prev (G, T, B, H); h0, c0, h_n, c_n, dh_n, dc_n, dh0, dc0 (G, B, H); w (G, 4H, H): each
// group's recurrent weight with its mask applied; lengths (G, B) in [0, T]; reverse (G,) and the
// masks: bytes of torch.bool, read as != 0 (a byte other than 0 or 1 is no bool). Gate order i, f,
// g, o as torch.nn.LSTM. Row (g, b) runs over times 0 .. lengths[g, b] - 1, backwards when
// reverse[g] (like a packed sequence); at the padded times t >= lengths[g, b] it keeps its state
// and writes hs = 0, gates = 0, cells = its c.
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// Per step at time t: pre = xproj[:, t] + h @ w^T (xproj carries the input projection and the
// biases), gates = act(pre) (saved, activated), c = f*c + i*g, h = o*tanh(c); h_prev[:, t] = the h
// that entered (for the weight gradient). gates, cells and h_prev may all be null (inference).
template <typename T>
void lstm_forward(int64_t G, int64_t T_, int64_t B, int64_t H, const T* xproj, const T* w, const T* h0,
                  const T* c0, const int64_t* lengths, const uint8_t* reverse, T* hs, T* gates, T* cells, T* h_prev,
                  T* h_n, T* c_n, int threads);

// Backward of lstm_forward from the saved gates and cells: dgates = the gradient w.r.t. the
// pre-activations (0 at inactive steps), dh0 and dc0 the gradients w.r.t. h0 and c0. dhs is the
// gradient of hs, dh_n / dc_n those of the final state.
template <typename T>
void lstm_backward(int64_t G, int64_t T_, int64_t B, int64_t H, const T* dhs, const T* dh_n, const T* dc_n,
                   const T* gates, const T* cells, const T* c0, const T* w, const int64_t* lengths,
                   const uint8_t* reverse, T* dgates, T* dh0, T* dc0, int threads);

// out[g] = where(masks[mask_index[g]], src[index[g]], 0): a select, not a product, so a weight
// outside the mask never reaches the output even when it is inf or NaN (0 * inf would be NaN);
// src[index[g]] itself when mask_index[g] < 0 or masks is null; each slice has `size` elements.
// index null: src[g].
// src and out may be the same array when index is null (masks a gradient in place).
template <typename T>
void mask_select(int64_t G, int64_t size, const T* src, const int64_t* index, const uint8_t* masks,
                 const int64_t* mask_index, T* out, int threads);

}  // namespace cpu
}  // namespace mtlfast
