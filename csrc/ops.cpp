// Every yaqa operator schema, in one place. Kernels are registered per backend in
// csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
#include <torch/library.h>

TORCH_LIBRARY(yaqa, m) {
  // H (n x n, fp32/fp64, lower triangle read) = L @ blockdiag(D) @ L^T with L unit
  // block-lower-triangular (n x n) and D the (n/b, b, b) diagonal blocks. info (int32, 0-d):
  // 0 success, k > 0 the leading minor of order k is not positive definite, -1 the lower
  // triangle of H holds a NaN or infinity. Never synchronises with the host on CUDA.
  m.def("block_ldl(Tensor H, int block_size) -> (Tensor L, Tensor D, Tensor info)");

  // y = (Had_{2^k} kron had) x / sqrt(n) along the last dimension of x (n = 2^k * c), with had the
  // c x c +-1 factor (fp32; None for c = 1). Same dtype as x, computed in fp32 (fp64 for fp64).
  m.def("hadamard_transform(Tensor x, Tensor? had) -> Tensor");

  // Kronecker-factor sketches (ALGORITHMS.md section 3), accumulated in place into fp32/fp64
  // factors; products in fp64 when X or G is fp64, else fp32 (TF32 on CUDA only with allow_tf32).
  // A P absent means identity. Every update is symmetric: the result is the upper triangle of
  // H + update, mirrored, so H stays exactly symmetric.
  // Sketch B, per sequence: Gw_b = G_b^T X_b for X (B, T, n), G (B, T, m);
  //   H_in += sum_b Gw_b^T P_out Gw_b,  H_out += sum_b Gw_b P_in Gw_b^T.
  // contraction: "gradient" forms each Gw_b first, "gram" goes through the T x T Gram matrices
  // (H_in += X_b^T (G_b P_out G_b^T) X_b), "auto" takes the one with fewer flops per factor.
  m.def("sketch_b_update(Tensor X, Tensor G, Tensor(a!) H_in, Tensor(b!) H_out, Tensor? P_in=None, "
        "Tensor? P_out=None, bool allow_tf32=False, str contraction=\"auto\") -> ()");
  // Sketch A, per token of X (..., n), G (..., m):
  //   H_in += (g_t P_out g_t^T) x_t^T x_t,  H_out += (x_t P_in x_t^T) g_t^T g_t.
  m.def("sketch_a_update(Tensor X, Tensor G, Tensor(a!)? H_in, Tensor(b!)? H_out, Tensor? P_in=None, "
        "Tensor? P_out=None, bool allow_tf32=False) -> ()");
  // H += sum_t x_t^T x_t over every token of X (..., n) (the GPTQ / LDLQ Hessian).
  m.def("input_moment_update(Tensor X, Tensor(a!) H, bool allow_tf32=False) -> ()");

  // Two-sided LDLQ (ALGORITHMS.md section 6) of W (m x n, fp32) in td_x x td_y tiles with the
  // strictly block-lower parts of L_in (n x n) and L_out (m x m); an absent factor is the identity
  // (L_out None: one-sided LDLQ; both None: round to nearest). The
  // scalar grid code = clamp(round(x / s + z), 0, 2^bits - 1), value (code - z) * s, with s, z of
  // shape (m, n / group_size). Returns W_hat (fp32, exactly the values of codes) and codes (uint8).
  m.def("ldlq_round(Tensor W, Tensor? L_in, Tensor? L_out, Tensor scales, Tensor zeros, int bits, int group_size, "
        "int td_x, int td_y) -> (Tensor W_hat, Tensor codes)");

  // Two-sided LDLQ on the E8P lattice codebook (csrc/e8p.h): W (m x n, fp32, 8 | n, 8 | td_y) rounded 8 columns
  // of a row at a time; abs_grid the (256, 8) pattern table; scales (m, stages) fp32 > 0, one per row and stage;
  // bits 2 (E8P), 3 (+ a sign stage), 4 (+ a second E8P stage). Returns W_hat (fp32, exactly the values of the
  // codes) and codes (int32, m x n / 8: stage 1 in bits 0-15, stage 2 in bits 16-31).
  m.def("ldlq_round_e8p(Tensor W, Tensor? L_in, Tensor? L_out, Tensor scales, Tensor abs_grid, int bits, int td_x, "
        "int td_y) -> (Tensor W_hat, Tensor codes)");

  // Two-sided LDLQ with bitshift trellis codes (csrc/trellis.h) on 16 x 16 units (16 | m, n, td_x, td_y): table the
  // 2^L state values (fp32, L a multiple of bits), scales (m, 1) fp32 > 0. Returns W_hat (fp32, exactly the values
  // of the codes) and codes (uint8, one row of 256 + (L - bits) / bits symbols < 2^bits per unit, units row-major).
  // tail_biting: every row's last (L - bits) / bits symbols repeat its first ones (stored: its first 256 only).
  // CUDA: one thread block per unit's search, the 2^L costs in shared memory (L <= 14 on an H100).
  m.def("ldlq_round_trellis(Tensor W, Tensor? L_in, Tensor? L_out, Tensor scales, Tensor table, int bits, int td_x, "
        "int td_y, bool tail_biting=False) -> (Tensor W_hat, Tensor codes)");

  // y = x W_hat^T for x (..., n) and the packed scalar-grid weight W_hat = (codes - z) * s (m x n):
  // qweight (m, ceil(n / 8) * bits) uint8 holds each row's codes as a little-endian bit stream (8 codes
  // in `bits` bytes), scales / zeros (1 or m, n / group_size) fp16 or fp32. The weight is never
  // materialised: codes are decoded a row (small batches) or a tile of rows (large ones) at a time.
  // y has x's dtype and shape (..., m); computed in fp32 (fp64 for fp64 x).
  m.def("int_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "Tensor? sign_in=None, Tensor? had_in=None, Tensor? sign_out=None, Tensor? had_out=None) -> Tensor");

  // y = x W_hat^T for the packed E8P weight: qweight (m, n / 8 * bits) uint8 holds each unit's code in `bits`
  // little-endian bytes (the codes of ldlq_round_e8p), scales (1 or m, stages) fp16 or fp32; the optional RHT as
  // for int_matmul. y has x's dtype and shape (..., m); computed in fp32 (fp64 for fp64 x).
  m.def("e8p_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor abs_grid, int bits, Tensor? sign_in=None, "
        "Tensor? had_in=None, Tensor? sign_out=None, Tensor? had_out=None) -> Tensor");

  // y = x W_hat^T for the packed trellis weight (trellis_matmul): qweight ((m / 16) (n / 16), ceil(symbols / 8) *
  // bits) uint8, the symbol streams of ldlq_round_trellis's units (tail-biting: their first 256 symbols, 32 bits
  // bytes); scales (m, 1) fp16 or fp32 (m from them); table the 2^L state values.
  m.def("trellis_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor table, int bits, Tensor? sign_in=None, "
        "Tensor? had_in=None, Tensor? sign_out=None, Tensor? had_out=None) -> Tensor");
}
