// Fused fp32 CPU kernels of a Llama decode iteration (issue 30, item 3 "an efficient step").
// Loaded by cpu_kernels.py (built once per machine with torch's C++ extension loader); registered as
// torch.ops.chainserve_cpu.*. Each replaces several eager ops of chainserve's lean layer with one pass:
//   paged_decode_attention  RoPE on the new token's q and k, its k and v written into the row's page,
//                           attention over the row's pages in place (no gather, no mask);
//   silu_mul                silu(gate) * up of a merged gate/up GEMM's output;
//   rms_norm                the layer's input RMSNorm (one pass; torch's composite op takes ~50 us);
//   add_rms_norm            the residual add and the next RMSNorm;
//   pack_panels,            a linear's weight packed once into panels of 32 outputs, and the GEMM
//   panel_linear            y = x W^T (+ b) over them (below).
// The attention's dot products take four keys per pass over q, and its weighted sum four values per
// pass over the output (fewer horizontal sums and output loads: 4.5 against 5.8 ms for 30 layers of
// 8 rows at 80 positions, this machine, one thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": float32 on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": 2-d rows with unit column stride");
}

// qkv [B, (Hq + 2 Hk) D]: each row one session's new token (q heads, k heads, v heads side by side);
// cos, sin [B, D]; keys, values [pages, P, Hk, D]; table [B, n]: row r's pages in order; positions [B]:
// the new token's position. Returns [B, Hq D], each q head attending to its row's positions 0..position.
at::Tensor paged_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor keys, at::Tensor values, const at::Tensor& table,
                                  const at::Tensor& positions, int64_t q_heads, int64_t kv_heads, double scale) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "keys, values: contiguous pages of one shape");
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, "keys, values: float32");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0 && keys.size(2) == kv_heads, "heads: q_heads a multiple of kv_heads");
  const int64_t B = qkv.size(0), P = keys.size(1), D = keys.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (q_heads + 2 * kv_heads) * D, "qkv: width is (q_heads + 2 kv_heads) head_dim");
  const auto c = cos.reshape({B, D}).contiguous(), s = sin.reshape({B, D}).contiguous();
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, "cos, sin: float32");
  const auto tab = table.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(tab.dim() == 2 && tab.size(0) == B && pos.numel() == B, "table [B, n], positions [B]");
  const int64_t n = tab.size(1), pages = keys.size(0), group = q_heads / kv_heads, row_stride = qkv.stride(0);
  const float* x = qkv.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] / P < n, "positions: row ", r, "'s position ", pp[r], " lies beyond its pages");
    for (int64_t j = 0; j <= pp[r] / P; ++j) {
      TORCH_CHECK(tp[r * n + j] >= 0 && tp[r * n + j] < pages, "table: page ", tp[r * n + j], " is not in the pool");
    }
  }
  auto out = at::empty({B, q_heads * D}, qkv.options());
  auto rotated = at::empty({B, q_heads, D}, qkv.options());
  float* qr = rotated.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tok_stride = kv_heads * D, page_stride = P * tok_stride;
  // RoPE (x cos + rotate_half(x) sin) on every q and k head; k and v into the new position's page slot
  for (int64_t r = 0; r < B; ++r) {
    const float* row = x + r * row_stride;
    const float* cr = cp + r * D;
    const float* sr = sp + r * D;
    const int64_t slot = tp[r * n + pp[r] / P] * page_stride + (pp[r] % P) * tok_stride;
    for (int64_t h = 0; h < q_heads + kv_heads; ++h) {
      const float* in = row + h * D;
      float* dst = h < q_heads ? qr + (r * q_heads + h) * D : kp + slot + (h - q_heads) * D;
      for (int64_t i = 0; i < D; ++i) {
        const float rot = i < half ? -in[i + half] : in[i - half];
        dst[i] = in[i] * cr[i] + rot * sr[i];
      }
    }
    const float* v_new = row + (q_heads + kv_heads) * D;
    std::copy(v_new, v_new + kv_heads * D, vp + slot);
  }
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * q_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / q_heads, h = job % q_heads, g = h / group, L = pp[r] + 1;
      const float* qv = qr + job * D;
      score.resize(L);
      float* w = score.data();
      // where position t of this row's kv head g lies in the pool of keys or values
      const auto at = [&](const float* pool, int64_t t) {
        return pool + tp[r * n + t / P] * page_stride + (t % P) * tok_stride + g * D;
      };
      int64_t t = 0;
      for (; t + 4 <= L; t += 4) {
        const float *k0 = at(kp, t), *k1 = at(kp, t + 1), *k2 = at(kp, t + 2), *k3 = at(kp, t + 3);
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t i = 0; i < D; ++i) {
          d0 += qv[i] * k0[i];
          d1 += qv[i] * k1[i];
          d2 += qv[i] * k2[i];
          d3 += qv[i] * k3[i];
        }
        w[t] = d0 * sc;
        w[t + 1] = d1 * sc;
        w[t + 2] = d2 * sc;
        w[t + 3] = d3 * sc;
      }
      for (; t < L; ++t) {
        const float* k = at(kp, t);
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; ++i) dot += qv[i] * k[i];
        w[t] = dot * sc;
      }
      const float top = *std::max_element(w, w + L);
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) w[t] = expf(w[t] - top);
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t t = 0; t < L; ++t) total += w[t];
      float* o = op + r * q_heads * D + h * D;
      std::fill(o, o + D, 0.f);
      int64_t u = 0;
      for (; u + 4 <= L; u += 4) {
        const float *v0 = at(vp, u), *v1 = at(vp, u + 1), *v2 = at(vp, u + 2), *v3 = at(vp, u + 3);
        const float w0 = w[u], w1 = w[u + 1], w2 = w[u + 2], w3 = w[u + 3];
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) o[i] += w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i];
      }
      for (; u < L; ++u) {
        const float* v = at(vp, u);
        const float wt = w[u];
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) o[i] += wt * v[i];
      }
      const float inv = 1.f / total;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
    }
  });
  return out;
}

// gate_up [T, 2I] (gate's I columns, then up's) → silu(gate) * up [T, I]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: an even width");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = at::empty({T, I}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* g = in + t * stride;
    const float* u = g + I;
    float* d = o + t * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) d[i] = g[i] / (1.f + expf(-g[i])) * u[i];
  }
  return out;
}

void check_norm_weight(const at::Tensor& weight, const at::Tensor& hidden) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == hidden.size(1),
              "weight: float32 [H]");
}

// o = a / sqrt(squares / H + eps) * w over one row of H, given squares = sum(a²)
void rms_scale_row(const float* a, float squares, const float* w, float* o, int64_t H, double eps) {
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(H) + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (a[i] * inv);
}

// RMSNorm of hidden [T, H]: hidden / sqrt(mean(hidden²) + eps) * weight
at::Tensor rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  check_rows(hidden, "hidden");
  check_norm_weight(weight, hidden);
  const int64_t T = hidden.size(0), H = hidden.size(1);
  auto normed = at::empty({T, H}, hidden.options());
  const float* wp = weight.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* a = hidden.data_ptr<float>() + t * hidden.stride(0);
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < H; ++i) squares += a[i] * a[i];
    rms_scale_row(a, squares, wp, normed.data_ptr<float>() + t * H, H, eps);
  }
  return normed;
}

// hidden + delta [T, H] → (that sum, RMSNorm of it: sum / sqrt(mean(sum²) + eps) * weight)
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& hidden, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(hidden, "hidden");
  check_rows(delta, "delta");
  TORCH_CHECK(hidden.sizes() == delta.sizes(), "hidden, delta: one shape");
  check_norm_weight(weight, hidden);
  const int64_t T = hidden.size(0), H = hidden.size(1);
  auto sum = at::empty({T, H}, hidden.options()), normed = at::empty({T, H}, hidden.options());
  const float* wp = weight.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* a = hidden.data_ptr<float>() + t * hidden.stride(0);
    const float* b = delta.data_ptr<float>() + t * delta.stride(0);
    float* s = sum.data_ptr<float>() + t * H;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < H; ++i) {
      s[i] = a[i] + b[i];
      squares += s[i] * s[i];
    }
    rms_scale_row(s, squares, wp, normed.data_ptr<float>() + t * H, H, eps);
  }
  return {sum, normed};
}


// ---- the panel GEMM -------------------------------------------------------------------------------
// A decode iteration multiplies a few rows (one per session) by every weight of the span: it streams
// the weights from memory once and is bound by that stream, not by arithmetic. oneDNN's GEMM on its
// reordered weight ran SmolLM2's 30 layers of GEMMs at 8 rows in 37 ms on this machine (one thread)
// where the weights alone take ~21 ms to read. Here each weight is packed once into panels of PANEL
// output columns, [ceil(N / PANEL), K, PANEL] (zero columns past N), so a panel is one contiguous
// stream; a tile of up to MAX_ROWS rows keeps its 2 x rows accumulators in vector registers while
// the panel streams past once (a panel stays in L2 for the next tile of a longer input). Each output
// is the plain sum over k in order, whatever the other rows are: a row's result does not depend on
// the batch it is in (tests/runtime/test_cpu_kernels.py checks this bit for bit).
constexpr int64_t LANES = 16;
constexpr int64_t PANEL = 2 * LANES;
constexpr int64_t MAX_ROWS = 12;
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

inline lanes_t load_lanes(const float* p) {
  lanes_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// rows x [ROWS, K] (row stride ldx) times one panel [K, PANEL] (+ bias[PANEL]) → out [ROWS, PANEL] (stride ldo)
template <int ROWS>
void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* out,
                int64_t ldo) {
  lanes_t lo[ROWS], hi[ROWS];
  const lanes_t b_lo = bias ? load_lanes(bias) : lanes_t{}, b_hi = bias ? load_lanes(bias + LANES) : lanes_t{};
  for (int r = 0; r < ROWS; ++r) lo[r] = b_lo, hi[r] = b_hi;
  for (int64_t k = 0; k < K; ++k) {
    const lanes_t w_lo = load_lanes(panel + k * PANEL), w_hi = load_lanes(panel + k * PANEL + LANES);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      const float a = x[r * ldx + k];
      lo[r] += w_lo * a;
      hi[r] += w_hi * a;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    std::memcpy(out + r * ldo, &lo[r], sizeof(lanes_t));
    std::memcpy(out + r * ldo + LANES, &hi[r], sizeof(lanes_t));
  }
}

using tile_fn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t);
constexpr tile_fn TILES[MAX_ROWS] = {panel_tile<1>, panel_tile<2>, panel_tile<3>, panel_tile<4>,
                                     panel_tile<5>, panel_tile<6>, panel_tile<7>, panel_tile<8>,
                                     panel_tile<9>, panel_tile<10>, panel_tile<11>, panel_tile<12>};

// weight [N, K] → panels [ceil(N / PANEL), K, PANEL]
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "weight: float32 [out, in] on the CPU");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + PANEL - 1) / PANEL;
  auto padded = at::zeros({panels * PANEL, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();
}

// x [..., K] times the panels of an [N, K] weight (+ bias [N]) → [..., N]
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1, "x: float32 [..., in] on the CPU");
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.dim() == 3 &&
                  panels.size(2) == PANEL && panels.size(1) == x.size(-1),
              "panels: pack_panels of a weight whose in_features is x's width");
  const int64_t N = out_features, K = panels.size(1), P = panels.size(0);
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "out_features: ", N, " does not match ", P, " panels");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: float32 [out_features]");
  const auto rows_in = x.reshape({-1, K}).contiguous();
  const int64_t M = rows_in.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto out = at::empty(shape, x.options());
  if (M == 0) return out;
  std::vector<float> bias_pad;
  if (bias) {
    bias_pad.assign(P * PANEL, 0.f);
    std::copy_n(bias->data_ptr<float>(), N, bias_pad.begin());
  }
  const float* xs = rows_in.data_ptr<float>();
  const float* ws = panels.data_ptr<float>();
  const float* bs = bias ? bias_pad.data() : nullptr;
  float* ys = out.data_ptr<float>();
  const int64_t tiles = (M + MAX_ROWS - 1) / MAX_ROWS, rows = (M + tiles - 1) / tiles;  // tiles of even size
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    float last[MAX_ROWS * PANEL];  // the last panel's columns before those past N are dropped
    for (int64_t p = begin; p < end; ++p) {
      const bool whole = (p + 1) * PANEL <= N;
      for (int64_t m0 = 0; m0 < M; m0 += rows) {
        const int64_t n = std::min(rows, M - m0);
        float* dest = whole ? ys + m0 * N + p * PANEL : last;
        TILES[n - 1](xs + m0 * K, K, ws + p * K * PANEL, K, bs ? bs + p * PANEL : nullptr, dest, whole ? N : PANEL);
        for (int64_t r = 0; !whole && r < n; ++r)
          std::copy_n(last + r * PANEL, N - p * PANEL, ys + (m0 + r) * N + p * PANEL);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(chainserve_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor table, Tensor positions, int q_heads, int kv_heads, float scale) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rms_norm(Tensor hidden, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor hidden, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("pack_panels(Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(chainserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("silu_mul", silu_mul);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("pack_panels", pack_panels);
  m.impl("panel_linear", panel_linear);
}
