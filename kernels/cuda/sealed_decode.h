// Arguments of the CUDA decode split kernel (sealed_decode.cu), shared with its Python binding.
// Plain C++ (no torch, no CUDA headers): the binding fills it from tensors, the .cu launches from it.
#pragma once

#include <cstdint>

namespace diffkv {

constexpr int kMaxTiers = 2;       // tier 0 (k8v4) and tier 1 (k4v2): the tiers the kernel reads
constexpr int kSectionKinds = 5;   // format.KEYS, VALUES, KEY_META, VALUE_META, INDEX

// Byte offset of one tier's section inside a sealed block with n0 tier-0 and n1 tier-1 rows:
// n0 * per_row[0] + n1 * per_row[1] + start (block_read.sealed_format_constants, from format.py's coefficients).
struct SectionLine {
  int per_row[kMaxTiers];
  int start;
};

struct SealedDecodeArgs {
  // q [batch, num_kv_heads * group, head_dim], bfloat16 (q_bf16) or float16, strides in elements (last dim 1);
  // staged blocks hold keys and values in the same dtype
  const void* q;
  int64_t q_stride_b;
  int64_t q_stride_h;
  bool q_bf16;
  // the store (format.BlockView): arena bytes, block_offset [slots] int64, page_state [pages] int8,
  // tier_counts [slots, num_tiers] int32
  const uint8_t* arena;
  const int64_t* block_offset;
  const int8_t* page_state;
  const int32_t* tier_counts;
  // the plan: page_table / staged_rank [*, page_table_stride] int32, seq_lens [batch] int32
  const int32_t* page_table;
  const int32_t* staged_rank;
  int64_t page_table_stride;
  const int32_t* seq_lens;
  // the split workspace of DecodePlan: part_m / part_l [rows, group], part_acc [rows, group * head_dim] float32,
  // row (b * num_kv_heads + h) * num_splits + split; logits [batch, num_kv_heads, staged_cap, page_size, group]
  // float32: base-2 logits of staged tokens at the page's staged rank (what _decode_merge_kernel reads)
  float* part_m;
  float* part_l;
  float* part_acc;
  float* logits;
  int staged_cap;
  int batch, num_kv_heads, group, head_dim, page_size, num_layers, num_tiers, layer;
  int num_splits, min_pages_per_split;   // the split ranges of _decode_split_kernel / _decode_merge_kernel
  float qk_scale;                        // softmax scale * log2(e): logits are base 2
  int state_staged, state_sealed;        // format.PageState codes
  SectionLine sections[kSectionKinds][kMaxTiers];   // [kind][tier]
  int meta_scales[kMaxTiers];            // start of the two float32 meta scales: n0 * [0] + n1 * [1]
  int bytes_per_row[kMaxTiers];          // BlockFormat.bytes_per_token(tier)
  int block_fixed_bytes;                 // BlockFormat.data_nbytes of an empty block (the two meta scales)
  int block_align;                       // format.BLOCK_ALIGN: block sizes are multiples of it (16 for the bulk copy)
  int staged_values;                     // StagedBlockFormat.values_start: byte offset of a staged block's values
  int stages;              // blocks in flight per warp (shared-memory ring slots), 2 .. 8
  int slot_bytes;          // bytes of one ring slot: the largest sealed block of a page
};

struct SealedDecodeKernelInfo {
  int registers;     // per thread
  int local_bytes;   // stack frame / spills per thread
  int ctas_per_sm;   // resident CTAs per multiprocessor at smem_bytes of dynamic shared memory
};

// Dynamic shared memory the kernel needs for these arguments (barriers, ring, cross-warp exchange).
int sealed_decode_smem_bytes(const SealedDecodeArgs& args);

// Launch the split kernel on `stream` (a cudaStream_t). Returns nullptr, or the CUDA error's text.
const char* launch_sealed_decode_split(const SealedDecodeArgs& args, void* stream);

// Registers, spills and occupancy of the kernel instantiated for head_dim and the query dtype.
const char* sealed_decode_kernel_info(int head_dim, bool q_bf16, int smem_bytes, SealedDecodeKernelInfo* info);

}  // namespace diffkv
