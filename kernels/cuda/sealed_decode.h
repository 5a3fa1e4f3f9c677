// Arguments of the CUDA sealed-page decode split kernel (sealed_decode.cu), shared with its Python binding.
// Plain C++ (no torch, no CUDA headers): the binding fills it from tensors, the .cu launches from it.
#pragma once

#include <cstdint>

namespace diffkv {

// Byte offset of one section inside a block whose high tier holds n rows (the other tiers empty):
// per_row * n + start. From format.BlockFormat.section_coefficients (tier 0's coefficient and the constant).
struct SectionLine {
  int per_row;
  int start;
};

struct SealedDecodeArgs {
  // q [batch, num_kv_heads * group, head_dim], bfloat16 (q_bf16) or float16, strides in elements (last dim 1)
  const void* q;
  int64_t q_stride_b;
  int64_t q_stride_h;
  bool q_bf16;
  // the store (format.BlockView): arena bytes, block_offset [slots] int64, tier_counts [slots, num_tiers] int32
  const uint8_t* arena;
  const int64_t* block_offset;
  const int32_t* tier_counts;
  // the plan: page_table [*, page_table_stride] int32, seq_lens [batch] int32
  const int32_t* page_table;
  int64_t page_table_stride;
  const int32_t* seq_lens;
  // the split workspace of DecodePlan: part_m / part_l [rows, group], part_acc [rows, group * head_dim] float32,
  // row (b * num_kv_heads + h) * num_splits + split
  float* part_m;
  float* part_l;
  float* part_acc;
  int batch, num_kv_heads, group, head_dim, page_size, num_layers, num_tiers, layer;
  int num_splits, min_pages_per_split;   // the split ranges of _decode_split_kernel / _decode_merge_kernel
  float qk_scale;                        // softmax scale * log2(e): logits are base 2
  // a layer's sealed block with n rows, all in tier 0 (K8V4, one group)
  SectionLine keys, values, key_meta, value_meta, meta_scales, index;
  int bytes_per_row;       // BlockFormat.bytes_per_token(0)
  int block_fixed_bytes;   // BlockFormat.data_nbytes of an empty block (the two meta scales)
  int block_align;         // format.BLOCK_ALIGN: block sizes are multiples of it (16 for the bulk copy)
  int stages;              // blocks in flight per warp (shared-memory ring slots), 2 .. 8
  int slot_bytes;          // bytes of one ring slot: a block of page_size rows rounded up to whole 16-row tiles
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
