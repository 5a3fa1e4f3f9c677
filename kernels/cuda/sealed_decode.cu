// Split-K decode attention over one layer's pages as a serving batch meets them (issue 12): SEALED blocks whose
// kept tokens are in tier 0 (K8V4) and / or tier 1 (K4V2), one quantization group, no rotation; STAGED blocks
// (the page's keys and values in the model dtype); EMPTY pages and all-pruned blocks contribute nothing. It
// writes the split workspace of kernels/decode_attention.py (PART_M, PART_L, PART_ACC and the staged tokens'
// LOGITS: same rows, same split ranges, same indexing as _decode_split_kernel) and the Triton _decode_merge_kernel
// finishes (output, staged-token importance). The launcher (kernels/cuda_decode.py) refuses other formats.
//
// Grid (num_splits, num_kv_heads, batch); one CTA of 4 warps per (request b, KV head h, split). The split's pages
// are dealt to the warps round robin (warp w takes pages w, w + 4, ...); each warp is independent until the end:
//   * its own shared-memory ring of `stages` slots: lane 0 copies whole sealed blocks into it with one 1-D bulk
//     copy each (cp.async.bulk, completion counted in bytes on one mbarrier per slot), `stages` blocks ahead;
//   * descriptors (page id -> page state, block offset, tier counts) are loaded a lane per page, 32 pages at a
//     time, one batch ahead, and handed to lane 0 / the whole warp with shuffles;
//   * per sealed block, per tier, 16-row tiles of that tier's rows (its sections are contiguous row arrays, so a
//     tier's tile is gathered from the block in shared memory at the tier's section starts; rows are clamped to
//     the tier's last row, so nothing past the block is read): keys as the M=16 side of mma.sync m16n8k16 with
//     the G <= 8 query heads as N=8 (swap-AB), codes turned into float16 operands in registers (prmt / lop3),
//     scale and zero point applied on the accumulators, online softmax (base 2) per head, then values:
//     O^T[D x 8] += V^T[D x 16] P^T[16 x 8];
//   * a staged block is read from global memory (the last 1-3 pages of a request): the same tiles and products
//     with model-dtype operands (bfloat16 / float16 mma), its base-2 logits stored to LOGITS at the page's staged
//     rank for the merge kernel's importance recording;
//   * at the end the 4 warps' (max, sum, output) are merged through shared memory into one workspace row.
// Arithmetic follows _decode_split_kernel (decode_attention.py's module docstring): the query enters float16
// scaled by a power of two so that max |q| of the group lies in [2^14, 2^15); sealed logits are
// key_ms * scale * (s * (q~ . c) + z * sum(q~)); value weights p * s * 2^16 enter float16 and the output is kept
// in units of (the last block's value meta scale) * 2^-16, with the zero points' share summed per head. Staged
// tokens: q and k in the model dtype (exact products), p rounded to it, their values added in those units.
//
// Fragment layouts relied on (PTX ISA, mma.m16n8k16 with 16-bit inputs; lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16 x 16, row major), 4 registers of 2 halves: a[0] = (row g,   cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1),
//                                                    a[2] = (row g,   cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9)
//   B (16 x 8, "col"), 2 registers: b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   C (16 x 8 float):   c[0] = (row g, col 2t), c[1] = (row g, col 2t+1), c[2] = (row g+8, col 2t), c[3] = (row g+8, col 2t+1)
//   (the lower half of a register is the lower column / row index)
//   movmatrix.m8n8.trans: a register holding (row g, cols 2t, 2t+1) of an 8 x 8 matrix returns (row g, cols 2t, 2t+1)
//   of its transpose.
// Free choices (a product is unchanged by permuting its K index in both operands, and its M rows are named by us):
//   * keys: K index k of 16-dimension chunk c is dimension key_dim(c, t, k) (key_dim below): lane (g, t) reads its
//     4 dimensions of a chunk as one 32-bit word of 8-bit codes (16 contiguous bytes for 4 chunks), two bytes of
//     4-bit codes (8 bytes for 4 chunks) or 8 bytes of model-dtype keys; the query is laid out the same way.
//   * tile rows: row m of a 16-row tile (M of the key product, K of the value product) is the tile's row
//     tile_row(m) of the tier (a permutation chosen to spread shared-memory banks, see tile_row).
//   * values: M row g of value chunk c is dimension (D / 8) * g + 2c, M row g + 8 is the next one; lane (g, t)
//     reads its D / 8 dimensions of a token as one 16- to 64-bit word of codes (or 16-byte words of a staged
//     block) and the output columns come out in pairs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "sealed_decode.h"

namespace diffkv {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kHeads = 8;                  // N of the products: the GQA group, padded with zero queries
constexpr int kTileRows = 16;
constexpr int kMaxStages = 8;
constexpr int kBarrierBytes = kWarps * kMaxStages * 8;    // mbarriers at the start of dynamic shared memory
constexpr float kWeightScale = 65536.0f;                  // decode_attention.W_SHIFT = 16
constexpr float kWeightUnscale = 1.0f / 65536.0f;
constexpr unsigned kFullMask = 0xffffffffu;

// ----------------------------------------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void barrier_init(uint64_t* barrier) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier)) : "memory");
}

// Make the barriers' initialisation visible to the copy engine (the async proxy) before its first use.
__device__ __forceinline__ void barrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
}

// One arrival that also expects `bytes` of copy transactions: the phase completes when they have landed.
__device__ __forceinline__ void barrier_expect_bytes(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void barrier_wait(uint64_t* barrier, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
  }
}

// 1-D bulk copy global -> shared (16-byte aligned addresses, a multiple of 16 bytes), completing on `barrier`.
__device__ __forceinline__ void bulk_copy(void* destination, const void* source, uint32_t bytes, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          shared_address(destination)),
      "l"(source), "r"(bytes), "r"(shared_address(barrier))
      : "memory");
}

// Order this thread's earlier shared-memory reads before later copy-engine writes to the same bytes.
__device__ __forceinline__ void async_proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// d += a b, m16n8k16, float16 inputs, float32 accumulators (layouts in the file header).
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose_8x8(uint32_t fragment) {
  uint32_t result;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(result) : "r"(fragment));
  return result;
}

// (a & mask) | bits in one instruction
__device__ __forceinline__ uint32_t mask_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t result;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(result) : "r"(a), "r"(mask), "r"(bits));
  return result;
}

__device__ __forceinline__ uint32_t sub_f16x2(uint32_t a, uint32_t b) {
  uint32_t result;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(result) : "r"(a), "r"(b));
  return result;
}

__device__ __forceinline__ uint32_t fma_f16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t result;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(result) : "r"(a), "r"(b), "r"(c));
  return result;
}

__device__ __forceinline__ float fast_exp2(float x) {   // 2^x; 2^-inf = 0 (what tl.exp2 gives)
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(x));
  return result;
}

// ------------------------------------------------------------------------------------------- code unpacking
// The float16 bits 0x6400 | x are 1024 + x for 0 <= x < 1024, so a code byte or nibble placed under 0x64 (0x6400)
// becomes an exact float16 after subtracting 1024 (or, for a field k bits up, after x / 2^k - 1024 / 2^k).
constexpr uint32_t kF16Bias = 0x64006400u;          // (1024, 1024)

// Bytes 0, 1 (selector 0x4140) or 2, 3 (0x4342) of a word of 8-bit codes as float16 (low half: the lower byte).
__device__ __forceinline__ uint32_t byte_codes(uint32_t word, uint32_t selector) {
  return sub_f16x2(__byte_perm(word, 0x64646464u, selector), kF16Bias);
}

__device__ __forceinline__ uint32_t pack_f16x2(float low, float high) {
  const __half2 packed = __floats2half2_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&packed);
}

__device__ __forceinline__ float low_half(uint32_t word) { return __half2float(__ushort_as_half(word & 0xffffu)); }
__device__ __forceinline__ float high_half(uint32_t word) { return __half2float(__ushort_as_half(word >> 16)); }

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ float pow2_ratio(float a, float b) {   // a / b for powers of two, by exponents
  return __int_as_float(__float_as_int(a) - __float_as_int(b) + (127 << 23));
}

// ---------------------------------------------------------------------------------------------- index maps
// Tile row (of the block's 16-row tile) that M row / K index m of the products stands for. Rows 2t, 2t+1, 2t+8,
// 2t+9 (one lane's value tokens) map to t, (t^1)+4, t+8, (t^1)+12, so for each of those four loads the four lanes
// t = 0..3 of a row group read rows in distinct 32-byte bank groups (head_dim 64; half that at 128), and rows g,
// g+1 of a key load differ in parity; m + 8 maps to tile_row(m) + 8.
__device__ __forceinline__ int tile_row(int m) {
  const int pair = (m >> 1) & 3, odd = m & 1, upper = m >> 3;
  return (pair ^ odd) + 4 * (2 * upper + odd);
}

// Key dimension of K index k (0, 1: lanes' columns 2t, 2t+1; 2, 3: columns 2t+8, 2t+9) in chunk c for lane t:
// lane t holds bytes 16t .. 16t+15 of each 64-dimension half, 4 per chunk.
__device__ __forceinline__ int key_dim(int c, int t, int k) { return (c / 4) * 64 + 16 * t + 4 * (c % 4) + k; }


// ------------------------------------------------------------------------------------------- tiers, codes
// The 4-bit (low, high) nibbles of byte `B` (0..3) of `word` as two float16 (low half: the low nibble): the byte
// is put under both halves, the low nibble masked into one and the high one (x16) into the other, then
// (1024 + lo, 1024 + 16 hi) * (1, 1/16) - (1024, 64).
__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, uint32_t B) {
  const uint32_t spread = __byte_perm(word, 0u, 0x4040u | B | (B << 8));
  return fma_f16x2(mask_or(spread, 0x00f0000fu, kF16Bias), 0x2c003c00u, 0xd400e400u);
}

// Key codes of K indices 2 * k2, 2 * k2 + 1 of chunk i (0..3) of a 64-dimension half, from the lane's words of
// that half (KB = 8: four words, one per chunk; KB = 4: two words, two bytes per chunk), as a float16 pair.
template <int KB>
__device__ __forceinline__ uint32_t key_codes(const uint32_t* words, int i, int k2) {
  if constexpr (KB == 8) {
    return byte_codes(words[i], k2 ? 0x4342u : 0x4140u);
  } else {
    return nibble_pair(words[i / 2], 2 * (i % 2) + k2);
  }
}

// Field 0 (bits 0 .. VB-1) and field 1 (bits VB .. 2 VB - 1) of both 16-bit halves of `pair` as float16.
template <int VB>
__device__ __forceinline__ uint32_t value_field0(uint32_t pair) {
  constexpr uint32_t mask = ((1u << VB) - 1) * 0x00010001u;
  return sub_f16x2(mask_or(pair, mask, kF16Bias), kF16Bias);
}

template <int VB>
__device__ __forceinline__ uint32_t value_field1(uint32_t pair) {
  constexpr uint32_t mask = ((1u << VB) - 1) * 0x00010001u << VB;
  // (1024 + 2^VB x) * 2^-VB - 1024 * 2^-VB: VB = 4: (1/16, -64); VB = 2: (1/4, -256)
  constexpr uint32_t scale = VB == 4 ? 0x2c002c00u : 0x34003400u;
  constexpr uint32_t offset = VB == 4 ? 0xd400d400u : 0xdc00dc00u;
  return fma_f16x2(mask_or(pair, mask, kF16Bias), scale, offset);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float low, float high) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 packed = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&packed);
  } else {
    return pack_f16x2(low, high);
  }
}

// d += a b, m16n8k16 with bfloat16 or float16 inputs (the model dtype of staged blocks), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_model(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    mma_16816(d, a0, a1, a2, a3, b0, b1);
  }
}

// One tier's rows of a sealed block in shared memory: its sections' starts and its row count.
struct TierRows {
  const uint8_t* keys;
  const uint8_t* values;
  const uint8_t* key_meta;
  const uint8_t* value_meta;
  const uint8_t* index;
  int n;
};

template <int T>
__device__ __forceinline__ TierRows tier_rows(const uint8_t* block, int n0, int n1, const SealedDecodeArgs& a) {
  const auto at = [&](int kind) {
    const SectionLine& s = a.sections[kind][T];
    return block + s.per_row[0] * n0 + s.per_row[1] * n1 + s.start;
  };
  return TierRows{at(0), at(1), at(2), at(3), at(4), T == 0 ? n0 : n1};
}

// ----------------------------------------------------------------------------------------------- block math
template <int D>
struct WarpState {
  float m[2];                  // running max (base 2) of heads 2t, 2t+1 (the same in every lane of a column)
  float l[2];                  // this lane's share of the running sums (its rows)
  float zero_acc[2];           // this lane's share of the zero points' contribution, units of acc
  float acc[D / 16][4];        // O^T: value chunk c, C layout (dims (D/8) g + 2c + {0, 1} x heads 2t, 2t+1)
  float unit;                  // acc is in units of unit * 2^-16 (the last block's value meta scale)
};

struct QueryOperands {
  float key_scale;             // softmax scale * log2(e) / (the query's power-of-two scaling)
  float sum[2];                // sum of the float16 query of heads 2t, 2t+1
};

// The query of the lane's head g (zero for g >= group) as B operands: q_frag[c][r] holds dims key_dim(c, t, 2r),
// key_dim(c, t, 2r + 1), scaled by the power of two that puts max |q| of the group in [2^14, 2^15).
template <int D, typename QT>
__device__ QueryOperands load_query(const SealedDecodeArgs& a, int b, int h, int g, int t,
                                    uint32_t (&q_frag)[D / 16][2]) {
  constexpr int kChunks = D / 16;
  float q[kChunks][4];
  float largest = 0.0f;
  const QT* row = static_cast<const QT*>(a.q) + b * a.q_stride_b + (int64_t)(h * a.group + g) * a.q_stride_h;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float x = g < a.group ? to_float(row[key_dim(c, t, k)]) : 0.0f;
      q[c][k] = x;
      largest = fmaxf(largest, fabsf(x));
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, offset));
  const int biased = (__float_as_int(largest) >> 23) & 255;
  const int shift = min(max(141 - biased, -126), 127);
  const float q_pow = __int_as_float((shift + 127) << 23);
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    q_frag[c][0] = pack_f16x2(q[c][0] * q_pow, q[c][1] * q_pow);
    q_frag[c][1] = pack_f16x2(q[c][2] * q_pow, q[c][3] * q_pow);
    sum += (low_half(q_frag[c][0]) + high_half(q_frag[c][0])) + (low_half(q_frag[c][1]) + high_half(q_frag[c][1]));
  }
  sum += __shfl_xor_sync(kFullMask, sum, 1);
  sum += __shfl_xor_sync(kFullMask, sum, 2);          // head g's sum, in the 4 lanes of row group g
  QueryOperands ops;
  ops.key_scale = a.qk_scale * __int_as_float((127 - shift) << 23);
  ops.sum[0] = __shfl_sync(kFullMask, sum, 8 * t);       // head 2t lives in lanes 4 * (2t) .. 4 * (2t) + 3
  ops.sum[1] = __shfl_sync(kFullMask, sum, 8 * t + 4);   // head 2t + 1
  return ops;
}

// Base-2 logits of one 16-row tile (rows `base` .. of tier `r`, KB-bit keys) in the C layout: s[0], s[1] for tier
// row base + tile_row(g) (heads 2t, 2t+1), s[2], s[3] for 8 rows further; -inf for rows past the tier's rows or,
// on a request's last page, tokens at or past `valid`. Reads clamp rows to the tier's last one.
template <int D, int KB>
__device__ __forceinline__ void key_logits(const TierRows& r, int base, int row_g, int valid, bool check_index,
                                           float key_scale, const uint32_t (&q_frag)[D / 16][2],
                                           const QueryOperands& query, int t, float (&s)[4], bool (&live)[2]) {
  constexpr int kRowBytes = D * KB / 8;
  const int rows[2] = {base + row_g, base + row_g + 8};
  const int row_a = min(rows[0], r.n - 1), row_b = min(rows[1], r.n - 1);
  float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int half = 0; half < D / 64; ++half) {
    uint32_t codes_a[KB / 2], codes_b[KB / 2];    // the lane's 16 dimensions of the half: 16 or 8 bytes
    const uint8_t* at_a = r.keys + row_a * kRowBytes + half * (8 * KB) + t * (2 * KB);
    const uint8_t* at_b = r.keys + row_b * kRowBytes + half * (8 * KB) + t * (2 * KB);
    if constexpr (KB == 8) {
      const uint4 wa = *reinterpret_cast<const uint4*>(at_a), wb = *reinterpret_cast<const uint4*>(at_b);
      codes_a[0] = wa.x, codes_a[1] = wa.y, codes_a[2] = wa.z, codes_a[3] = wa.w;
      codes_b[0] = wb.x, codes_b[1] = wb.y, codes_b[2] = wb.z, codes_b[3] = wb.w;
    } else {
      const uint2 wa = *reinterpret_cast<const uint2*>(at_a), wb = *reinterpret_cast<const uint2*>(at_b);
      codes_a[0] = wa.x, codes_a[1] = wa.y;
      codes_b[0] = wb.x, codes_b[1] = wb.y;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = 4 * half + i;
      mma_16816(dot, key_codes<KB>(codes_a, i, 0), key_codes<KB>(codes_b, i, 0), key_codes<KB>(codes_a, i, 1),
                key_codes<KB>(codes_b, i, 1), q_frag[c][0], q_frag[c][1]);
    }
  }
  const int read[2] = {row_a, row_b};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    live[k] = rows[k] < r.n && (!check_index || r.index[read[k]] < valid);
    const uint32_t meta = *reinterpret_cast<const uint32_t*>(r.key_meta + 4 * read[k]);
    const float scale = low_half(meta) * key_scale, zero = high_half(meta) * key_scale;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[2 * k + j] = live[k] ? fmaf(scale, dot[2 * k + j], zero * query.sum[j]) : -INFINITY;
    }
  }
}

// Value codes (VB bits) of tier row `row` as words: the lane's dimensions (D / 8) g .. (D / 8) (g + 1) - 1, i.e.
// D * VB / 64 bytes (8, 4 or 2).
template <int D, int VB>
__device__ __forceinline__ void load_value_words(const uint8_t* values, int row, int g,
                                                 uint32_t (&words)[(D * VB + 255) / 256]) {
  constexpr int kSlice = D * VB / 64;
  const uint8_t* at = values + row * (D * VB / 8) + kSlice * g;
  if constexpr (kSlice == 8) {
    const uint2 pair = *reinterpret_cast<const uint2*>(at);
    words[0] = pair.x;
    words[1] = pair.y;
  } else if constexpr (kSlice == 4) {
    words[0] = *reinterpret_cast<const uint32_t*>(at);
  } else {
    words[0] = *reinterpret_cast<const uint16_t*>(at);
  }
}

// O^T += V^T P^T for one tile of tier `r` (VB-bit values): p[4] are the tile's probabilities in the C layout of
// key_logits (rows row_g, row_g + 8; heads 2t, 2t+1), already 0 on dead rows.
template <int D, int VB>
__device__ __forceinline__ void accumulate_values(const TierRows& r, int base, int row_g, const bool (&live)[2],
                                                  const float (&p)[4], int g, int t, WarpState<D>& st) {
  constexpr int kWords = (D * VB + 255) / 256;
  const int meta_rows[2] = {min(base + row_g, r.n - 1), min(base + row_g + 8, r.n - 1)};
  float weight[4];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const uint32_t meta = *reinterpret_cast<const uint32_t*>(r.value_meta + 4 * meta_rows[k]);
    const float scale = live[k] ? low_half(meta) * kWeightScale : 0.0f;
    const float zero = live[k] ? high_half(meta) * kWeightScale : 0.0f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      weight[2 * k + j] = p[2 * k + j] * scale;
      st.zero_acc[j] = fmaf(p[2 * k + j], zero, st.zero_acc[j]);
    }
  }
  // C layout (token rows x heads) -> B layout (K = tokens, N = heads): transpose each 8 x 8 half
  const uint32_t b0 = transpose_8x8(pack_f16x2(weight[0], weight[1]));
  const uint32_t b1 = transpose_8x8(pack_f16x2(weight[2], weight[3]));
  // K index 2t, 2t+1, 2t+8, 2t+9 of the product = tile rows tile_row(2t), tile_row(2t+1), + 8 of each
  const int last = r.n - 1;
  uint32_t x[kWords], y[kWords], x8[kWords], y8[kWords];
  load_value_words<D, VB>(r.values, min(base + tile_row(2 * t), last), g, x);
  load_value_words<D, VB>(r.values, min(base + tile_row(2 * t + 1), last), g, y);
  load_value_words<D, VB>(r.values, min(base + tile_row(2 * t) + 8, last), g, x8);
  load_value_words<D, VB>(r.values, min(base + tile_row(2 * t + 1) + 8, last), g, y8);
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    // chunk c: dims 2c, 2c+1 of the lane's slice = bits 2 c VB .. of it: the two tokens' 16-bit halves side by
    // side, shifted down to the chunk's fields
    constexpr int kBits = 2 * VB;
    const int bit = kBits * c, word = bit / 32, shift = bit % 16;
    const uint32_t selector = (bit % 32) < 16 ? 0x5410u : 0x7632u;
    const uint32_t low_pair = __byte_perm(x[word], y[word], selector) >> shift;     // tokens K 2t, 2t+1
    const uint32_t high_pair = __byte_perm(x8[word], y8[word], selector) >> shift;  // tokens K 2t+8, 2t+9
    mma_16816(st.acc[c], value_field0<VB>(low_pair), value_field1<VB>(low_pair), value_field0<VB>(high_pair),
              value_field1<VB>(high_pair), b0, b1);
  }
}

// One online-softmax step over two tiles' base-2 logits s[tile][4] (C layout, -inf: dead): s becomes the
// probabilities relative to the new running max; the running sums, the zero points' share and acc are rescaled
// (acc and the zero share also by `carry`, the change of value unit of a new block).
template <int D>
__device__ __forceinline__ void softmax_step(float (&s)[2][4], float carry, WarpState<D>& st) {
  float rescale[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    float top = fmaxf(fmaxf(s[0][j], s[0][j + 2]), fmaxf(s[1][j], s[1][j + 2]));
    top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 4));
    top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 8));
    top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 16));
    const float m_new = fmaxf(st.m[j], top);
    const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = fast_exp2(st.m[j] - m_safe);
    st.m[j] = m_new;
    float added = 0.0f;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      s[tile][j] = fast_exp2(s[tile][j] - m_safe);
      s[tile][j + 2] = fast_exp2(s[tile][j + 2] - m_safe);
      added += s[tile][j] + s[tile][j + 2];
    }
    st.l[j] = fmaf(st.l[j], alpha, added);
    rescale[j] = alpha * carry;
    st.zero_acc[j] *= rescale[j];
  }
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    st.acc[c][0] *= rescale[0];
    st.acc[c][1] *= rescale[1];
    st.acc[c][2] *= rescale[0];
    st.acc[c][3] *= rescale[1];
  }
}

// The rows of one tier (KB-bit keys, VB-bit values) of a block in shared memory: 32 rows per online-softmax step,
// 16 per product. `carry` is folded into the first step and then reset to 1.
template <int D, int KB, int VB>
__device__ void attend_tier(const TierRows& r, int valid, bool check_index, float key_scale,
                            const uint32_t (&q_frag)[D / 16][2], const QueryOperands& query, int g, int t,
                            float& carry, WarpState<D>& st) {
  const int row_g = tile_row(g);
  for (int step = 0; step < r.n; step += 2 * kTileRows) {
    float s[2][4];
    bool live[2][2];
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const int base = step + tile * kTileRows;
      if (base < r.n) {
        key_logits<D, KB>(r, base, row_g, valid, check_index, key_scale, q_frag, query, t, s[tile], live[tile]);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[tile][i] = -INFINITY;
        live[tile][0] = live[tile][1] = false;
      }
    }
    softmax_step<D>(s, carry, st);
    carry = 1.0f;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const int base = step + tile * kTileRows;
      if (base < r.n) accumulate_values<D, VB>(r, base, row_g, live[tile], s[tile], g, t, st);
    }
  }
}

// One sealed block (n0 tier-0 rows, n1 tier-1 rows, n0 + n1 > 0) in shared memory, tier by tier.
template <int D>
__device__ void attend_block(const uint8_t* block, int n0, int n1, int valid, const SealedDecodeArgs& a,
                             const uint32_t (&q_frag)[D / 16][2], const QueryOperands& query, int g, int t,
                             WarpState<D>& st) {
  const float* meta_scales = reinterpret_cast<const float*>(block + a.meta_scales[0] * n0 + a.meta_scales[1] * n1);
  const float key_scale = meta_scales[0] * query.key_scale;
  const float value_unit = meta_scales[1];
  float carry = pow2_ratio(st.unit, value_unit);      // acc to this block's unit, folded into the first rescale
  st.unit = value_unit;
  const bool check_index = valid < a.page_size;
  attend_tier<D, 8, 4>(tier_rows<0>(block, n0, n1, a), valid, check_index, key_scale, q_frag, query, g, t, carry, st);
  attend_tier<D, 4, 2>(tier_rows<1>(block, n0, n1, a), valid, check_index, key_scale, q_frag, query, g, t, carry, st);
}

// One staged block (global memory: keys [page_size, D] then values, model dtype QT) of which the first `valid`
// rows count; their base-2 logits go to `logits` [page_size, group] (nullptr: not recorded).
template <int D, typename QT>
__device__ void attend_staged(const uint8_t* block, int valid, float* logits, const SealedDecodeArgs& a,
                              const QT* q_row, int g, int t, WarpState<D>& st) {
  const QT* keys = reinterpret_cast<const QT*>(block);
  const QT* values = reinterpret_cast<const QT*>(block + a.staged_values);
  uint32_t q_frag[D / 16][2];               // the plain query of head g in the model dtype, key_dim order
  const uint16_t* q_bits = reinterpret_cast<const uint16_t*>(q_row);
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
#pragma unroll
    for (int k2 = 0; k2 < 2; ++k2) {
      const int dim = key_dim(c, t, 2 * k2);
      q_frag[c][k2] = g < a.group ? q_bits[dim] | (uint32_t)q_bits[dim + 1] << 16 : 0u;
    }
  }
  const int row_g = tile_row(g);
  const float to_acc = kWeightScale / st.unit;     // staged values join acc in its units (powers of two: exact)
  for (int step = 0; step < valid; step += 2 * kTileRows) {
    float s[2][4];
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const int rows[2] = {step + tile * kTileRows + row_g, step + tile * kTileRows + row_g + 8};
      const bool live[2] = {rows[0] < valid, rows[1] < valid};
      float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (step + tile * kTileRows < valid) {
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
          const int dim = key_dim(c, t, 0);
          const uint2 ka = live[0] ? *reinterpret_cast<const uint2*>(keys + rows[0] * D + dim) : make_uint2(0, 0);
          const uint2 kb = live[1] ? *reinterpret_cast<const uint2*>(keys + rows[1] * D + dim) : make_uint2(0, 0);
          mma_model<QT>(dot, ka.x, kb.x, ka.y, kb.y, q_frag[c][0], q_frag[c][1]);
        }
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[tile][2 * k + j] = live[k] ? dot[2 * k + j] * a.qk_scale : -INFINITY;
          const int head = 2 * t + j;
          if (logits != nullptr && live[k] && head < a.group) logits[rows[k] * a.group + head] = s[tile][2 * k + j];
        }
      }
    }
    softmax_step<D>(s, 1.0f, st);
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const int base = step + tile * kTileRows;
      if (base >= valid) continue;
      const uint32_t b0 = transpose_8x8(pack2<QT>(s[tile][0], s[tile][1]));
      const uint32_t b1 = transpose_8x8(pack2<QT>(s[tile][2], s[tile][3]));
      const int rows[4] = {base + tile_row(2 * t), base + tile_row(2 * t + 1), base + tile_row(2 * t) + 8,
                           base + tile_row(2 * t + 1) + 8};
#pragma unroll
      for (int part = 0; part < D / 64; ++part) {     // 8 of the lane's D / 8 dimensions of each token
        uint4 v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          v[k] = rows[k] < valid ? *reinterpret_cast<const uint4*>(values + rows[k] * D + (D / 8) * g + 8 * part)
                                 : make_uint4(0, 0, 0, 0);
        }
        const uint32_t w[4][4] = {{v[0].x, v[0].y, v[0].z, v[0].w}, {v[1].x, v[1].y, v[1].z, v[1].w},
                                  {v[2].x, v[2].y, v[2].z, v[2].w}, {v[3].x, v[3].y, v[3].z, v[3].w}};
#pragma unroll
        for (int i = 0; i < 4; ++i) {                  // chunk 4 part + i: dims 2c, 2c+1 of the slice = word i
          float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma_model<QT>(r, __byte_perm(w[0][i], w[1][i], 0x5410u), __byte_perm(w[0][i], w[1][i], 0x7632u),
                        __byte_perm(w[2][i], w[3][i], 0x5410u), __byte_perm(w[2][i], w[3][i], 0x7632u), b0, b1);
          float (&acc)[4] = st.acc[4 * part + i];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[e] = fmaf(r[e], to_acc, acc[e]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- descriptors
constexpr int kStagedBlock = -1;   // BlockDescriptor.counts of a staged page

struct BlockDescriptor {
  int64_t offset;   // arena byte offset
  int counts;       // sealed: n0 | n1 << 16 (0: nothing to read); kStagedBlock; 0 for empty pages
};

// Page id of the warp's page `i` (request page page_lo + warp + kWarps * i), or -1 past the warp's pages.
__device__ __forceinline__ int64_t warp_page_id(const SealedDecodeArgs& a, int b, int page_lo, int warp, int count,
                                                int i) {
  return i < count ? (int64_t)a.page_table[b * a.page_table_stride + page_lo + warp + kWarps * i] : -1;
}

// The loads are independent of each other (no chain): state, offset and counts, then selected.
__device__ __forceinline__ BlockDescriptor describe(const SealedDecodeArgs& a, int h, int64_t page) {
  BlockDescriptor d{0, 0};
  if (page >= 0) {
    const int64_t slot = (page * a.num_layers + a.layer) * a.num_kv_heads + h;
    const int state = a.page_state[page];
    d.offset = a.block_offset[slot];
    const int n0 = min(a.tier_counts[slot * a.num_tiers], a.page_size);
    const int n1 = a.num_tiers > 1 ? min(a.tier_counts[slot * a.num_tiers + 1], a.page_size - n0) : 0;
    d.counts = state == a.state_sealed ? n0 | n1 << 16 : state == a.state_staged ? kStagedBlock : 0;
  }
  return d;
}

// Lane `lane`'s entry of `current` or `next` (selected field by field: a selected struct would live in memory).
__device__ __forceinline__ BlockDescriptor lane_descriptor(const BlockDescriptor& current, const BlockDescriptor& next,
                                                           bool from_current, int lane) {
  BlockDescriptor r;
  r.offset = __shfl_sync(kFullMask, from_current ? current.offset : next.offset, lane);
  r.counts = __shfl_sync(kFullMask, from_current ? current.counts : next.counts, lane);
  return r;
}

// ------------------------------------------------------------------------------------------------- kernel
// One CTA per (split, KV head, request); see the file header.
template <int D, typename QT>
__global__ void __launch_bounds__(kThreads, 2) sealed_decode_split_kernel(const SealedDecodeArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int seq_len = a.seq_lens[b];
  const int num_pages = (seq_len + a.page_size - 1) / a.page_size;
  const int per_split = max((num_pages + a.num_splits - 1) / a.num_splits, a.min_pages_per_split);
  const int page_lo = split * per_split;
  if (page_lo >= num_pages) return;                     // the merge reads only the splits that have pages
  const int page_hi = min(page_lo + per_split, num_pages);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int count = max(0, (page_hi - page_lo - warp + kWarps - 1) / kWarps);   // this warp's pages

  uint64_t* barriers = reinterpret_cast<uint64_t*>(smem) + warp * kMaxStages;
  uint8_t* ring = smem + kBarrierBytes + (size_t)warp * a.stages * a.slot_bytes;
  if (lane == 0) {
    for (int s = 0; s < a.stages; ++s) barrier_init(&barriers[s]);
    barrier_init_fence();
  }
  __syncwarp();

  uint32_t q_frag[D / 16][2];
  const QueryOperands query = load_query<D, QT>(a, b, h, g, t, q_frag);
  const QT* q_row = static_cast<const QT*>(a.q) + b * a.q_stride_b + (int64_t)(h * a.group + g) * a.q_stride_h;
  float* logits = a.logits + ((int64_t)b * a.num_kv_heads + h) * a.staged_cap * a.page_size * a.group;
  WarpState<D> st;
  st.unit = 1.0f;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    st.m[j] = -INFINITY;
    st.l[j] = 0.0f;
    st.zero_acc[j] = 0.0f;
  }
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc[c][e] = 0.0f;
  }

  // Descriptors: lane k holds the warp's page 32 * batch + k of `current` (the batch being consumed) and of `next`
  // (the following one, described mid-batch from page ids loaded a batch earlier: no lane waits on a dependent
  // load after the first batch).
  BlockDescriptor current = describe(a, h, warp_page_id(a, b, page_lo, warp, count, lane));
  BlockDescriptor next{0, 0};
  int64_t next_ids = warp_page_id(a, b, page_lo, warp, count, 32 + lane);
  int batch = 0;
  // the warp's page i into ring slot i % stages if it is a sealed block with rows (lane 0 copies; every lane takes
  // part in the shuffles)
  auto issue = [&](int i) {
    if (i >= count) return;
    const BlockDescriptor d = lane_descriptor(current, next, i / 32 == batch, i % 32);
    if (d.counts > 0 && lane == 0) {
      const int slot = i % a.stages;
      const int data = a.bytes_per_row[0] * (d.counts & 0xffff) + a.bytes_per_row[1] * (d.counts >> 16) +
                       a.block_fixed_bytes;
      const uint32_t bytes = (data + a.block_align - 1) / a.block_align * a.block_align;
      barrier_expect_bytes(&barriers[slot], bytes);
      bulk_copy(ring + slot * a.slot_bytes, a.arena + d.offset, bytes, &barriers[slot]);
    }
  };
  for (int i = 0; i < a.stages; ++i) issue(i);
  uint32_t phases = 0;                                   // bit s: parity of slot s's next phase
  for (int i = 0; i < count; ++i) {
    if (i % 32 == 16) {
      next = describe(a, h, next_ids);
      next_ids = warp_page_id(a, b, page_lo, warp, count, i + 48 + lane);   // batch i / 32 + 2
    }
    const int slot = i % a.stages;
    const int counts = __shfl_sync(kFullMask, current.counts, i % 32);       // the same in every lane
    const int page = page_lo + warp + kWarps * i;
    const int valid = min(seq_len - page * a.page_size, a.page_size);
    if (counts > 0) {                                    // all-pruned blocks and empty pages: nothing to do
      barrier_wait(&barriers[slot], (phases >> slot) & 1u);
      phases ^= 1u << slot;
      attend_block<D>(ring + slot * a.slot_bytes, counts & 0xffff, counts >> 16, valid, a, q_frag, query, g, t, st);
      async_proxy_fence();
    } else if (counts == kStagedBlock) {
      const int64_t offset = __shfl_sync(kFullMask, current.offset, i % 32);
      const int rank = a.staged_rank[b * a.page_table_stride + page];
      float* page_logits = rank >= 0 && rank < a.staged_cap ? logits + (int64_t)rank * a.page_size * a.group
                                                            : nullptr;
      attend_staged<D, QT>(a.arena + offset, valid, page_logits, a, q_row, g, t, st);
    }
    __syncwarp();                                        // every lane has read the slot before it is refilled
    issue(i + a.stages);
    if (i % 32 == 31) {
      current = next;
      ++batch;
    }
  }

  // the warp's sums over its lanes; then the 4 warps' states through shared memory (the rings are drained)
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int offset = 4; offset < 32; offset <<= 1) {
      st.l[j] += __shfl_xor_sync(kFullMask, st.l[j], offset);
      st.zero_acc[j] += __shfl_xor_sync(kFullMask, st.zero_acc[j], offset);
    }
  }
  __syncthreads();
  float* exchange_acc = reinterpret_cast<float*>(smem + kBarrierBytes);   // [kWarps][kHeads][D], model units
  float* exchange_m = exchange_acc + kWarps * kHeads * D;                 // [kWarps][kHeads]
  float* exchange_l = exchange_m + kWarps * kHeads;
  const float out_unit = st.unit * kWeightUnscale;
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int head = 2 * t + (e & 1), dim = (D / 8) * g + 2 * c + (e >> 1);
      exchange_acc[(warp * kHeads + head) * D + dim] = (st.acc[c][e] + st.zero_acc[e & 1]) * out_unit;
    }
  }
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      exchange_m[warp * kHeads + 2 * t + j] = st.m[j];
      exchange_l[warp * kHeads + 2 * t + j] = st.l[j];
    }
  }
  __syncthreads();
  const int group = a.group;
  const int64_t row = ((int64_t)b * a.num_kv_heads + h) * a.num_splits + split;
  for (int e = threadIdx.x; e < group * D; e += kThreads) {
    const int head = e / D, dim = e % D;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, exchange_m[w * kHeads + head]);
    const float safe = top == -INFINITY ? 0.0f : top;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum += fast_exp2(exchange_m[w * kHeads + head] - safe) * exchange_acc[(w * kHeads + head) * D + dim];
    }
    a.part_acc[row * group * D + e] = sum;
    if (dim == 0) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += fast_exp2(exchange_m[w * kHeads + head] - safe) * exchange_l[w * kHeads + head];
      a.part_m[row * group + head] = top;
      a.part_l[row * group + head] = total;
    }
  }
}


template <int D, typename QT>
const char* launch(const SealedDecodeArgs& a, cudaStream_t stream) {
  const auto kernel = sealed_decode_split_kernel<D, QT>;
  const int smem = sealed_decode_smem_bytes(a);
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error == cudaSuccess) {      // a carveout that fits two CTAs per multiprocessor
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (error != cudaSuccess) return cudaGetErrorString(error);
  kernel<<<dim3(a.num_splits, a.num_kv_heads, a.batch), kThreads, smem, stream>>>(a);
  error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <int D, typename QT>
const char* kernel_info(int smem_bytes, SealedDecodeKernelInfo* info) {
  const auto kernel = sealed_decode_split_kernel<D, QT>;
  cudaFuncAttributes attributes;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (error == cudaSuccess) {
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (error == cudaSuccess) error = cudaFuncGetAttributes(&attributes, kernel);
  if (error == cudaSuccess) {
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info->ctas_per_sm, kernel, kThreads, smem_bytes);
  }
  if (error != cudaSuccess) return cudaGetErrorString(error);
  info->registers = attributes.numRegs;
  info->local_bytes = static_cast<int>(attributes.localSizeBytes);
  return nullptr;
}

}  // namespace

int sealed_decode_smem_bytes(const SealedDecodeArgs& a) {
  const int ring = kWarps * a.stages * a.slot_bytes;
  const int exchange = static_cast<int>(sizeof(float)) * (kWarps * kHeads * a.head_dim + 2 * kWarps * kHeads);
  return kBarrierBytes + (ring > exchange ? ring : exchange);
}

const char* launch_sealed_decode_split(const SealedDecodeArgs& a, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (a.head_dim == 128) return a.q_bf16 ? launch<128, __nv_bfloat16>(a, s) : launch<128, __half>(a, s);
  if (a.head_dim == 64) return a.q_bf16 ? launch<64, __nv_bfloat16>(a, s) : launch<64, __half>(a, s);
  return "sealed_decode: head_dim must be 64 or 128";
}

const char* sealed_decode_kernel_info(int head_dim, bool q_bf16, int smem_bytes, SealedDecodeKernelInfo* info) {
  if (head_dim == 128) {
    return q_bf16 ? kernel_info<128, __nv_bfloat16>(smem_bytes, info) : kernel_info<128, __half>(smem_bytes, info);
  }
  if (head_dim == 64) {
    return q_bf16 ? kernel_info<64, __nv_bfloat16>(smem_bytes, info) : kernel_info<64, __half>(smem_bytes, info);
  }
  return "sealed_decode: head_dim must be 64 or 128";
}

}  // namespace diffkv
