// Python binding of sealed_decode.cu (built by kernels/cuda_decode.py with torch.utils.cpp_extension.load):
// tensors and the block layout in, SealedDecodeArgs out, one launch on the caller's stream.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <vector>

#include "sealed_decode.h"

namespace {

// per kind and tier (per_row[0], per_row[1], start); meta_scales[2], bytes_per_row[2], block_fixed_bytes, block_align,
// staged_values, state_staged, state_sealed (kernels/cuda_decode.py: block_layout)
constexpr int kLineFields = diffkv::kSectionKinds * diffkv::kMaxTiers * (diffkv::kMaxTiers + 1);
constexpr int kLayoutFields = kLineFields + 2 * diffkv::kMaxTiers + 5;

int num_tiers_of(const torch::Tensor& tier_counts) { return static_cast<int>(tier_counts.size(-1)); }

void check_tensor(const torch::Tensor& x, const char* name, at::ScalarType dtype, const torch::Tensor& q) {
  TORCH_CHECK(x.scalar_type() == dtype, "sealed_decode: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == q.device(), "sealed_decode: ", name, " is on ", x.device(), ", q on ", q.device());
  TORCH_CHECK(x.is_contiguous(), "sealed_decode: ", name, " must be contiguous");
}

diffkv::SealedDecodeArgs make_args(const torch::Tensor& q, const torch::Tensor& arena,
                                   const torch::Tensor& block_offset, const torch::Tensor& page_state,
                                   const torch::Tensor& tier_counts, const torch::Tensor& page_table,
                                   const torch::Tensor& staged_rank, const torch::Tensor& seq_lens,
                                   const torch::Tensor& part_m, const torch::Tensor& part_l,
                                   const torch::Tensor& part_acc, const torch::Tensor& logits, int64_t staged_cap,
                                   int64_t num_kv_heads, int64_t layer,
                                   int64_t num_layers, int64_t page_size, int64_t num_splits,
                                   int64_t min_pages_per_split, double qk_scale, const std::vector<int64_t>& layout,
                                   int64_t stages, int64_t slot_bytes) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1, "sealed_decode: q must be a CUDA [B, Hq, D] tensor "
              "with a contiguous last dimension");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "sealed_decode: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(static_cast<int>(layout.size()) == kLayoutFields, "sealed_decode: layout needs ", kLayoutFields,
              " numbers, got ", layout.size());
  check_tensor(arena, "arena", at::kByte, q);
  check_tensor(block_offset, "block_offset", at::kLong, q);
  check_tensor(page_state, "page_state", at::kChar, q);
  check_tensor(tier_counts, "tier_counts", at::kInt, q);
  check_tensor(page_table, "page_table", at::kInt, q);
  check_tensor(staged_rank, "staged_rank", at::kInt, q);
  check_tensor(seq_lens, "seq_lens", at::kInt, q);
  for (const auto* part : {&part_m, &part_l, &part_acc, &logits}) {
    check_tensor(*part, "the split workspace", at::kFloat, q);
  }
  TORCH_CHECK(staged_rank.sizes() == page_table.sizes(), "sealed_decode: staged_rank and page_table differ in shape");
  TORCH_CHECK(num_tiers_of(tier_counts) <= diffkv::kMaxTiers, "sealed_decode: at most ", diffkv::kMaxTiers, " tiers");
  const int64_t batch = q.size(0), group = q.size(1) / num_kv_heads, rows = batch * num_kv_heads * num_splits;
  TORCH_CHECK(q.size(1) == group * num_kv_heads && group >= 1 && group <= 8,
              "sealed_decode: the query heads must be 1 to 8 per KV head");
  TORCH_CHECK(part_m.size(0) >= rows && part_l.size(0) >= rows && part_acc.size(0) >= rows &&
                  part_m.size(1) == group && part_acc.size(1) == group * q.size(2),
              "sealed_decode: the split workspace is smaller than batch x heads x splits");
  TORCH_CHECK(seq_lens.size(0) >= batch && page_table.size(0) >= batch, "sealed_decode: the plan holds fewer requests");
  TORCH_CHECK(logits.numel() >= batch * num_kv_heads * staged_cap * page_size * group,
              "sealed_decode: the staged-logit scratch is smaller than batch x heads x staged_cap x page x group");
  diffkv::SealedDecodeArgs a{};
  a.q = q.data_ptr();
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.q_bf16 = q.scalar_type() == at::kBFloat16;
  a.arena = arena.data_ptr<uint8_t>();
  a.block_offset = block_offset.data_ptr<int64_t>();
  a.page_state = page_state.data_ptr<int8_t>();
  a.tier_counts = tier_counts.data_ptr<int32_t>();
  a.page_table = page_table.data_ptr<int32_t>();
  a.staged_rank = staged_rank.data_ptr<int32_t>();
  a.page_table_stride = page_table.size(1);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.part_m = part_m.data_ptr<float>();
  a.part_l = part_l.data_ptr<float>();
  a.part_acc = part_acc.data_ptr<float>();
  a.logits = logits.data_ptr<float>();
  a.staged_cap = static_cast<int>(staged_cap);
  a.batch = static_cast<int>(batch);
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.group = static_cast<int>(group);
  a.head_dim = static_cast<int>(q.size(2));
  a.page_size = static_cast<int>(page_size);
  a.num_layers = static_cast<int>(num_layers);
  a.num_tiers = num_tiers_of(tier_counts);
  a.layer = static_cast<int>(layer);
  a.num_splits = static_cast<int>(num_splits);
  a.min_pages_per_split = static_cast<int>(min_pages_per_split);
  a.qk_scale = static_cast<float>(qk_scale);
  const auto field = [&](int i) { return static_cast<int>(layout[i]); };
  for (int kind = 0; kind < diffkv::kSectionKinds; ++kind) {
    for (int tier = 0; tier < diffkv::kMaxTiers; ++tier) {
      const int at = (kind * diffkv::kMaxTiers + tier) * (diffkv::kMaxTiers + 1);
      diffkv::SectionLine& line = a.sections[kind][tier];
      for (int u = 0; u < diffkv::kMaxTiers; ++u) line.per_row[u] = field(at + u);
      line.start = field(at + diffkv::kMaxTiers);
    }
  }
  for (int tier = 0; tier < diffkv::kMaxTiers; ++tier) {
    a.meta_scales[tier] = field(kLineFields + tier);
    a.bytes_per_row[tier] = field(kLineFields + diffkv::kMaxTiers + tier);
  }
  a.block_fixed_bytes = field(kLineFields + 2 * diffkv::kMaxTiers);
  a.block_align = field(kLineFields + 2 * diffkv::kMaxTiers + 1);
  a.staged_values = field(kLineFields + 2 * diffkv::kMaxTiers + 2);
  a.state_staged = field(kLineFields + 2 * diffkv::kMaxTiers + 3);
  a.state_sealed = field(kLineFields + 2 * diffkv::kMaxTiers + 4);
  a.stages = static_cast<int>(stages);
  a.slot_bytes = static_cast<int>(slot_bytes);
  return a;
}

// The split kernel for the planned batch (q.size(0) requests); writes part_m / part_l / part_acc and the staged
// tokens' logits.
void split(const torch::Tensor& q, const torch::Tensor& arena, const torch::Tensor& block_offset,
           const torch::Tensor& page_state, const torch::Tensor& tier_counts, const torch::Tensor& page_table,
           const torch::Tensor& staged_rank, const torch::Tensor& seq_lens, torch::Tensor part_m,
           torch::Tensor part_l, torch::Tensor part_acc, torch::Tensor logits, int64_t staged_cap,
           int64_t num_kv_heads, int64_t layer, int64_t num_layers, int64_t page_size, int64_t num_splits,
           int64_t min_pages_per_split, double qk_scale, const std::vector<int64_t>& layout, int64_t stages,
           int64_t slot_bytes, int64_t stream) {
  const diffkv::SealedDecodeArgs a =
      make_args(q, arena, block_offset, page_state, tier_counts, page_table, staged_rank, seq_lens, part_m, part_l,
                part_acc, logits, staged_cap, num_kv_heads, layer, num_layers, page_size, num_splits,
                min_pages_per_split, qk_scale, layout, stages, slot_bytes);
  const c10::DeviceGuard guard(q.device());
  const char* error = diffkv::launch_sealed_decode_split(a, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "sealed_decode: launch failed: ", error ? error : "");
}

int64_t smem_bytes(int64_t head_dim, int64_t stages, int64_t slot_bytes) {
  diffkv::SealedDecodeArgs a{};
  a.head_dim = static_cast<int>(head_dim);
  a.stages = static_cast<int>(stages);
  a.slot_bytes = static_cast<int>(slot_bytes);
  return diffkv::sealed_decode_smem_bytes(a);
}

pybind11::dict kernel_info(int64_t head_dim, bool q_bf16, int64_t smem) {
  diffkv::SealedDecodeKernelInfo info{};
  const char* error = diffkv::sealed_decode_kernel_info(static_cast<int>(head_dim), q_bf16, static_cast<int>(smem),
                                                        &info);
  TORCH_CHECK(error == nullptr, "sealed_decode: ", error ? error : "");
  pybind11::dict out;
  out["registers"] = info.registers;
  out["local_bytes"] = info.local_bytes;
  out["ctas_per_sm"] = info.ctas_per_sm;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("split", &split, "CUDA decode split kernel over sealed (k8v4 / k4v2) and staged pages (see sealed_decode.cu)");
  m.def("smem_bytes", &smem_bytes, "dynamic shared memory of one CTA");
  m.def("kernel_info", &kernel_info, "registers, local bytes and resident CTAs per SM of one instantiation");
}
