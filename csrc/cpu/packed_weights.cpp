#include "cpu/packed_weights.h"

#include "cpu/depthwise_avx2.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace qkernels {
namespace {

constexpr int64_t kMagic = 0x31386b7170;           // "pqk81"
constexpr int64_t kMagicDepthwise = 0x3177646b7170;  // "pqkdw1"
constexpr int64_t kHeader = 64;           // bytes: int64 magic, isa, O, Cg, kh, kw, groups, Kp

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Header {
  int64_t magic, isa, O, Cg, kh, kw, groups, Kp;
};
static_assert(sizeof(Header) == kHeader, "header layout");

// The header of a blob that may be one (an int8 CPU tensor, contiguous, long enough), or false.
bool read_header(const at::Tensor& blob, Header* h) {
  if (!blob.defined() || !blob.device().is_cpu() || blob.scalar_type() != at::kChar || !blob.is_contiguous() ||
      blob.numel() < kHeader)
    return false;
  std::memcpy(h, blob.data_ptr<int8_t>(), sizeof *h);
  return true;
}

// Offset of the first group's data: header, one has_min byte per group, aligned to 64.
int64_t data_offset(int64_t groups) { return round_up(kHeader + groups, 64); }

// One group's packed Q: AVX2's own layout, or int8_gemm's for the other instruction sets.
int64_t group_bytes(Int8Isa isa, int64_t Og, int64_t K) {
  return isa == Int8Isa::kAvx2 ? avx2_packed_q_bytes(Og, K) : int8_packed_q_bytes(isa, Og, K);
}

}  // namespace

at::Tensor pack_conv2d_int8_weight_cpu(const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 4,
              "qkernels: pack_conv2d_int8_weight expects an int8 weight [O, C/groups, kh, kw], got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "qkernels: groups (", groups,
              ") must divide the output channels (", weight.size(0), ")");
  const at::TensorOptions bytes = weight.options().dtype(at::kChar);
  const int64_t O = weight.size(0), Cg = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const bool depthwise = groups > 1 && Cg == 1 && O == groups;
  const Int8Isa isa = int8_isa();
  if (O == 0) return at::empty({0}, bytes);
  if (depthwise) {  // only the AVX2 depthwise kernel reads packed taps
    if (isa != Int8Isa::kAvx2 || !depthwise_avx2_takes_kernel_rows(kh)) return at::empty({0}, bytes);
    at::Tensor blob = at::empty({kHeader + depthwise_avx2_packed_bytes(O, kw)}, bytes);
    const Header h{kMagicDepthwise, (int64_t)isa, O, Cg, kh, kw, groups, 0};
    std::memcpy(blob.data_ptr<int8_t>(), &h, sizeof h);
    depthwise_avx2_pack(weight.contiguous().data_ptr<int8_t>(), O, kh, kw, blob.data_ptr<int8_t>() + kHeader);
    return blob;
  }
  const int64_t Og = O / groups, K = kh * kw * Cg, per_group = group_bytes(isa, Og, K);
  at::Tensor blob = at::empty({data_offset(groups) + groups * per_group}, bytes);
  int8_t* base = blob.data_ptr<int8_t>();
  const Header h{kMagic, (int64_t)isa, O, Cg, kh, kw, groups, int8_packed_q_kp(isa, K)};
  std::memcpy(base, &h, sizeof h);
  std::memset(base + kHeader, 0, data_offset(groups) - kHeader);
  const at::Tensor rows = weight.permute({0, 2, 3, 1}).contiguous();  // patch order (kh, kw, c)
  const int8_t* wp = rows.data_ptr<int8_t>();
  for (int64_t g = 0; g < groups; ++g) {
    auto source = [&](int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
      for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, wp + (g * Og + r0 + i) * K, K);
    };
    int8_t* dst = base + data_offset(groups) + g * per_group;
    if (isa == Int8Isa::kAvx2)
      base[kHeader + g] = avx2_pack_q(source, Og, K, dst) ? 1 : 0;
    else
      int8_pack_q(isa, source, Og, K, dst);
  }
  return blob;
}

PackedConvWeights packed_conv_weights(const at::Tensor& blob, const Int8ConvShape& s, Int8Isa isa) {
  PackedConvWeights v;
  Header h;
  if (!read_header(blob, &h)) return v;
  const int64_t Cg = s.C / s.groups, K = s.kh * s.kw * Cg;
  const bool fits = h.magic == kMagic && h.isa == (int64_t)isa && h.O == s.O && h.Cg == Cg && h.kh == s.kh &&
                    h.kw == s.kw && h.groups == s.groups && h.Kp == int8_packed_q_kp(isa, K) &&
                    blob.numel() == data_offset(s.groups) + s.groups * group_bytes(isa, s.O / s.groups, K);
  if (!fits) return v;
  v.valid = true;
  v.isa = isa;
  v.groups = s.groups;
  v.blob = &blob;
  return v;
}

const int8_t* packed_depthwise_weights(const at::Tensor& blob, const Int8ConvShape& s, Int8Isa isa) {
  Header h;
  if (!read_header(blob, &h)) return nullptr;
  const bool fits = h.magic == kMagicDepthwise && h.isa == (int64_t)isa && isa == Int8Isa::kAvx2 && h.O == s.O &&
                    h.Cg == 1 && h.kh == s.kh && h.kw == s.kw && h.groups == s.groups && s.groups == s.C &&
                    blob.numel() == kHeader + depthwise_avx2_packed_bytes(s.O, s.kw);
  return fits ? blob.data_ptr<int8_t>() + kHeader : nullptr;
}

namespace {

// Group g's packed Q, its row count and Kp (from the header, checked by packed_conv_weights).
const int8_t* group_data(const at::Tensor& blob, Int8Isa isa, int64_t g, int64_t* rows, int64_t* Kp) {
  Header h;
  const int8_t* base = blob.data_ptr<int8_t>();
  std::memcpy(&h, base, sizeof h);
  const int64_t Og = h.O / h.groups, K = h.kh * h.kw * h.Cg;
  *rows = Og;
  *Kp = h.Kp;
  return base + data_offset(h.groups) + g * group_bytes(isa, Og, K);
}

}  // namespace

Avx2PackedQ PackedConvWeights::group(int64_t g) const {
  TORCH_CHECK(isa == Int8Isa::kAvx2, "qkernels: an AVX2 view of weights packed for ", int8_isa_name(isa));
  Avx2PackedQ q;
  q.data = group_data(*blob, isa, g, &q.rows, &q.Kp);
  q.has_min = blob->data_ptr<int8_t>()[kHeader + g] != 0;
  return q;
}

Int8PackedQ PackedConvWeights::gemm_group(int64_t g) const {
  TORCH_CHECK(isa != Int8Isa::kAvx2, "qkernels: weights packed for AVX2 have no int8_gemm view");
  Int8PackedQ q;
  q.data = group_data(*blob, isa, g, &q.rows, &q.Kp);
  return q;
}

}  // namespace qkernels
