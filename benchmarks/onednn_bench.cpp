// switchmoe's SwitchLayer forward against the same MoE written on oneDNN (issue 15), interleaved
// in one process so that both see the same machine load.
//
// The MoE: d_model x d_ff = 768 x 3072, 8 experts, top-1, nothing dropped (dropless), ReLU, no
// biases, evaluation mode, y[t] = gate[t] * FFN_e(x[t]) with the router's softmax probability as
// the gate. Both sides use the same weights (copied from the switchmoe layer) and route the same,
// so both do the same work; the outputs are compared (column "max |dy|").
//
// The oneDNN side is written the way a performance-minded user would write it on oneDNN 2.x:
//   - weights prepacked once per expert into the layout the matmul picks (memory format `any`),
//     one packed copy per distinct layout the primitives choose;
//   - primitives created once per row count and cached (a primitive does not hold its weights,
//     so all experts share the primitives of a row count); memory objects cached with them and
//     re-pointed with set_data_handle;
//   - ReLU fused as an eltwise post-op of the first matmul (bf16: the hidden layer is written as
//     bf16 by that matmul, the second matmul reads it as bf16 and writes float32);
//   - a user scratchpad, one per thread;
//   - the router as a oneDNN matmul, then top-1 + softmax gate, a counting sort of the tokens by
//     expert, gather (bf16: converted with vcvtneps2bf16) and combine in plain loops.
// Variant "onednn_per_thread" (with --many_experts) gives each OpenMP thread whole experts
// (primitives created for one thread, one scratchpad and hidden buffer per thread).
//
// Timing: each case runs both implementations alternately (the order flips every repetition)
// and reports median times and the median of the per-repetition time ratios. Decode cases
// (tokens <= 64) flush every cache line of the process (flush_process_caches) before each
// timed call, so the call streams its weights from memory as in real inference over many
// layers; the memory-read probe reads, after the same flush, a buffer of exactly as many bytes
// as the weights of the experts the call touches, with all threads.
// "% bw" = those bytes / call time / probe bandwidth. "warm" repeats the call right away.
//
//   onednn_bench [--reps N] [--tokens 1,8,64,512,2048] [--precision fp32,bf16]
//                [--many_experts | --only_many_experts] [--schedule auto|split|whole]
//                [--ab_schedule] [--ab_rows] [--profile switchmoe|onednn]
//                [--json FILE]
// --schedule forces switchmoe's expert schedule (FeedForwardBank::whole_ffn_schedule);
// --ab_schedule also times switchmoe under both schedules, interleaved, and reports the ratio.
// --ab_rows also times switchmoe with balanced row tiles against kMr-row tiles and a remainder
// (kernels::detail::balanced_row_tiles), interleaved, and reports the ratio.
// --profile SIDE runs only that side's warm calls (--reps of them) and prints their median, so
// that `perf record` sees one implementation (setup aside).
// --many_experts also times switchmoe with 128 against 8 experts (512 x 2048, interleaved): the
// time per token ratio. --only_many_experts skips the 8 x 768 x 3072 cases.
// Needs libdnnl-dev (Debian; `bash cmake/install_deps.sh libdnnl-dev`); CMake skips this
// program when oneDNN is not found.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "switchmoe/switchmoe.hpp"
#include "timing.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe_bench::Clock;

using switchmoe_bench::median;
using switchmoe_bench::seconds_since;
// ---------------------------------------------------------------------------------------------
// Cache flush: clflushopt on every cache line of every writable private mapping of the process
// (/proc/self/maps: heap, anonymous mmaps, thread stacks; not the [stack] of the calling
// thread, [vvar] or [vsyscall]). The weights of both implementations, their buffers and the
// probe buffer all leave every cache level, whatever the cache's replacement policy (a large
// streaming read does not do that reliably: scan-resistant policies keep reused lines, which
// is how the first version of this benchmark reported more than 100% of the read bandwidth).
// Returns the bytes flushed.
std::size_t flush_process_caches() {
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return 0;
  std::size_t flushed = 0;
  char line[512];
  while (std::fgets(line, sizeof line, maps) != nullptr) {
    unsigned long begin = 0, end = 0;
    char perms[8] = {0};
    if (std::sscanf(line, "%lx-%lx %7s", &begin, &end, perms) != 3) continue;
    if (perms[0] != 'r' || perms[1] != 'w') continue;
    if (std::strstr(line, "[stack]") || std::strstr(line, "[vvar]") ||
        std::strstr(line, "[vsyscall]")) {
      continue;
    }
    for (unsigned long a = begin; a < end; a += 64) {
#if defined(__CLFLUSHOPT__)
      _mm_clflushopt(reinterpret_cast<void*>(a));
#else
      _mm_clflush(reinterpret_cast<void*>(a));
#endif
    }
    flushed += end - begin;
  }
  std::fclose(maps);
  _mm_mfence();
  return flushed;
}

// Memory-read probe: all threads stream disjoint parts of the first `bytes` of a buffer, which
// the caller has flushed from the caches (flush_process_caches), so the probe reads from
// memory exactly as many bytes as the call it is compared with.
class ReadProbe {
 public:
  explicit ReadProbe(std::size_t bytes) : floats_(bytes / sizeof(float)) {
    data_.reset(static_cast<float*>(std::aligned_alloc(64, floats_ * sizeof(float))));
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < floats_; ++i) data_.get()[i] = 1e-9f * static_cast<float>(i & 63);
  }
  std::size_t bytes() const { return floats_ * sizeof(float); }
  // Reads the first `bytes` of the buffer once; returns the bandwidth in bytes per second.
  double run(std::size_t bytes) {
    const std::size_t floats = std::min(floats_, bytes / sizeof(float));
    const auto start = Clock::now();
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
      const std::size_t threads = omp_get_num_threads(), id = omp_get_thread_num();
      const std::size_t chunk = floats / threads / 128 * 128;
      const float* p = data_.get() + id * chunk;
      __m512 acc[8];
      for (__m512& a : acc) a = _mm512_setzero_ps();
      for (std::size_t i = 0; i < chunk; i += 128) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(p + i + 16 * j));
      }
      for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[0]);
      for (float v : lanes) total += v;
    }
    const double s = seconds_since(start);
    sink_ += total;
    const std::size_t threads = omp_get_max_threads();
    return static_cast<double>(floats / threads / 128 * 128 * threads * sizeof(float)) / s;
  }
  float sink() const { return sink_; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::size_t floats_;
  std::unique_ptr<float, Free> data_;
  float sink_ = 0.0f;
};

// ---------------------------------------------------------------------------------------------
// The MoE on oneDNN.
struct MoeShape {
  int d_model, d_ff, experts;
};

class OnednnMoe {
 public:
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;

  // w_in[e] [d_model, d_ff], w_out[e] [d_ff, d_model], router [d_model, experts]: row-major
  // float32 masters, converted to bf16 when `bf16`.
  OnednnMoe(const MoeShape& shape, bool bf16, bool per_thread, const Matrix<float>& router,
            const std::vector<const Matrix<float>*>& w_in,
            const std::vector<const Matrix<float>*>& w_out)
      : shape_(shape),
        wdt_(bf16 ? dt::bf16 : dt::f32),
        per_thread_(per_thread),
        engine_(dnnl::engine::kind::cpu, 0),
        stream_(engine_),
        router_(router) {
    const int d_model = shape.d_model, d_ff = shape.d_ff;
    for (int e = 0; e < shape.experts; ++e) {
      w_in_plain_.push_back(plain_weights(*w_in[e], d_model, d_ff));
      w_out_plain_.push_back(plain_weights(*w_out[e], d_ff, d_model));
    }
    w_in_packed_.resize(shape.experts);
    w_out_packed_.resize(shape.experts);
    const int threads = omp_get_max_threads();
    scratch_.resize(threads);
    hidden_thread_.resize(threads);
  }

  // y [tokens, d_model] = MoE(x [tokens, d_model]).
  void forward(const Matrix<float>& x, Matrix<float>& y) {
    const int tokens = static_cast<int>(x.rows());
    const int d_model = shape_.d_model, d_ff = shape_.d_ff, experts = shape_.experts;
    // Router logits [tokens, experts] = x * router.
    logits_.resize(tokens, experts);
    RouterStep& r = router_step(tokens);
    r.src.set_data_handle(const_cast<float*>(x.data()));
    r.dst.set_data_handle(logits_.data());
    r.prim.execute(stream_, {{DNNL_ARG_SRC, r.src},
                             {DNNL_ARG_WEIGHTS, r.weights},
                             {DNNL_ARG_DST, r.dst},
                             {DNNL_ARG_SCRATCHPAD, scratchpad(0, r.scratch_bytes)}});
    // Top-1 and gate = softmax probability of the chosen expert; counting sort by expert.
    choice_.resize(tokens);
    gate_.resize(tokens);
    offsets_.assign(experts + 1, 0);
    for (int t = 0; t < tokens; ++t) {
      const float* l = logits_.data() + static_cast<std::ptrdiff_t>(t) * experts;
      int best = 0;
      for (int e = 1; e < experts; ++e) best = l[e] > l[best] ? e : best;
      float sum = 0.0f;
      for (int e = 0; e < experts; ++e) sum += std::exp(l[e] - l[best]);
      choice_[t] = best;
      gate_[t] = 1.0f / sum;
      ++offsets_[best + 1];
    }
    for (int e = 0; e < experts; ++e) offsets_[e + 1] += offsets_[e];
    row_of_.resize(tokens);
    fill_ = offsets_;
    for (int t = 0; t < tokens; ++t) row_of_[t] = fill_[choice_[t]]++;
    // Gather x rows by expert (bf16: converted).
    const std::size_t elem = wdt_ == dt::bf16 ? 2 : 4;
    xg_.resize(static_cast<std::size_t>(tokens) * d_model * elem);
    hidden_.resize(static_cast<std::size_t>(tokens) * d_ff * elem);
    yg_.resize(static_cast<std::size_t>(tokens) * d_model);
#pragma omp parallel for schedule(static) if (tokens >= 64)
    for (int t = 0; t < tokens; ++t) {
      const float* src = x.data() + static_cast<std::ptrdiff_t>(t) * d_model;
      char* dst = xg_.data() + static_cast<std::size_t>(row_of_[t]) * d_model * elem;
      if (wdt_ == dt::bf16) {
        for (int j = 0; j < d_model; j += 16) {
          const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * j),
                              reinterpret_cast<__m256i>(v));
        }
      } else {
        std::memcpy(dst, src, d_model * sizeof(float));
      }
    }
    // Experts.
    if (per_thread_) {
      run_experts_per_thread();
    } else {
      for (int e = 0; e < experts; ++e) {
        const int m = offsets_[e + 1] - offsets_[e];
        if (m == 0) continue;
        ExpertSteps& s = expert_steps(m);
        s.src.set_data_handle(xg_.data() + static_cast<std::size_t>(offsets_[e]) * d_model * elem);
        s.hidden.set_data_handle(hidden_.data() +
                                 static_cast<std::size_t>(offsets_[e]) * d_ff * elem);
        s.dst.set_data_handle(yg_.data() + static_cast<std::size_t>(offsets_[e]) * d_model);
        s.up.execute(stream_, {{DNNL_ARG_SRC, s.src},
                               {DNNL_ARG_WEIGHTS, w_in_packed_[e][s.up_format]},
                               {DNNL_ARG_DST, s.hidden},
                               {DNNL_ARG_SCRATCHPAD, scratchpad(0, s.up_scratch)}});
        s.down.execute(stream_, {{DNNL_ARG_SRC, s.hidden},
                                 {DNNL_ARG_WEIGHTS, w_out_packed_[e][s.down_format]},
                                 {DNNL_ARG_DST, s.dst},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad(0, s.down_scratch)}});
      }
    }
    // Combine: y[t] = gate[t] * yg[row(t)].
    y.resize(tokens, d_model);
#pragma omp parallel for schedule(static) if (tokens >= 64)
    for (int t = 0; t < tokens; ++t) {
      const float* src = yg_.data() + static_cast<std::size_t>(row_of_[t]) * d_model;
      float* dst = y.data() + static_cast<std::ptrdiff_t>(t) * d_model;
      const __m512 g = _mm512_set1_ps(gate_[t]);
      for (int j = 0; j < d_model; j += 16) {
        _mm512_storeu_ps(dst + j, _mm512_mul_ps(g, _mm512_loadu_ps(src + j)));
      }
    }
  }

 private:
  struct RouterStep {
    dnnl::matmul prim;
    dnnl::memory src, weights, dst;
    std::size_t scratch_bytes = 0;
  };
  struct ExpertSteps {
    dnnl::matmul up, down;                       // x W_in with ReLU; h W_out
    std::size_t up_format = 0, down_format = 0;  // index of the packed weight copy
    std::size_t up_scratch = 0, down_scratch = 0;
    dnnl::memory::desc src_md, hidden_md, dst_md;
    dnnl::memory src, hidden, dst;  // re-pointed per expert
  };
  struct PackedSet {  // one layout, all experts' weights in it
    dnnl::memory::desc md;
  };

  dnnl::memory plain_weights(const Matrix<float>& w, int k, int n) {
    // The master as a float32 oneDNN memory [k, n] row-major (tag ab); its own copy.
    dnnl::memory m({{k, n}, dt::f32, tag::ab}, engine_);
    std::memcpy(m.get_data_handle(), w.data(), static_cast<std::size_t>(k) * n * sizeof(float));
    return m;
  }

  dnnl::memory& scratchpad(int thread, std::size_t bytes) {
    auto& s = scratch_[thread];
    if (!s || s.get_desc().get_size() < bytes) {
      s = dnnl::memory(
          {{static_cast<dnnl::memory::dim>(std::max<std::size_t>(bytes, 64))}, dt::u8, tag::a},
          engine_);
    }
    return s;
  }

  RouterStep& router_step(int tokens) {
    auto it = router_steps_.find(tokens);
    if (it != router_steps_.end()) return it->second;
    const int d_model = shape_.d_model, experts = shape_.experts;
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::memory::desc src({tokens, d_model}, dt::f32, tag::ab);
    const dnnl::memory::desc wei({d_model, experts}, dt::f32, tag::ab);
    const dnnl::memory::desc dst({tokens, experts}, dt::f32, tag::ab);
    dnnl::matmul::primitive_desc pd({src, wei, dst}, attr, engine_);
    RouterStep r;
    r.prim = dnnl::matmul(pd);
    r.src = dnnl::memory(src, engine_, nullptr);
    r.weights = dnnl::memory(wei, engine_, const_cast<float*>(router_.data()));
    r.dst = dnnl::memory(dst, engine_, nullptr);
    r.scratch_bytes = pd.scratchpad_desc().get_size();
    return router_steps_.emplace(tokens, std::move(r)).first->second;
  }

  // The index of `md` among the packed layouts of `packed`; packs every expert's weights into
  // it when it is new.
  std::size_t packed_format(const dnnl::memory::desc& md, std::vector<dnnl::memory::desc>& formats,
                            std::vector<std::vector<dnnl::memory>>& packed,
                            const std::vector<dnnl::memory>& plain) {
    for (std::size_t i = 0; i < formats.size(); ++i) {
      if (formats[i] == md) return i;
    }
    formats.push_back(md);
    for (std::size_t e = 0; e < plain.size(); ++e) {
      dnnl::memory m(md, engine_);
      dnnl::memory src = plain[e];  // a handle: reorder takes non-const references
      dnnl::reorder(src, m).execute(stream_, src, m);
      packed[e].push_back(m);
    }
    stream_.wait();
    return formats.size() - 1;
  }

  // The primitives of an expert that receives m rows (one set per row count, cached).
  ExpertSteps& expert_steps(int m) {
    auto& cache = per_thread_ ? thread_steps_ : steps_;
    auto it = cache.find(m);
    if (it != cache.end()) return it->second;
    const int d_model = shape_.d_model, d_ff = shape_.d_ff;
    // Per-thread primitives are created for one thread: they run inside the experts' loop.
    const int saved_threads = omp_get_max_threads();
    if (per_thread_) omp_set_num_threads(1);
    ExpertSteps s;
    s.src_md = dnnl::memory::desc({m, d_model}, wdt_, tag::ab);
    s.hidden_md = dnnl::memory::desc({m, d_ff}, wdt_, tag::ab);
    s.dst_md = dnnl::memory::desc({m, d_model}, dt::f32, tag::ab);
    dnnl::primitive_attr up_attr;
    up_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops relu;
    relu.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    up_attr.set_post_ops(relu);
    const dnnl::memory::desc up_wei({d_model, d_ff}, wdt_, tag::any);
    dnnl::matmul::primitive_desc up_pd({s.src_md, up_wei, s.hidden_md}, up_attr, engine_);
    dnnl::primitive_attr down_attr;
    down_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::memory::desc down_wei({d_ff, d_model}, wdt_, tag::any);
    dnnl::matmul::primitive_desc down_pd({s.hidden_md, down_wei, s.dst_md}, down_attr, engine_);
    if (per_thread_) omp_set_num_threads(saved_threads);
    s.up = dnnl::matmul(up_pd);
    s.down = dnnl::matmul(down_pd);
    s.up_scratch = up_pd.scratchpad_desc().get_size();
    s.down_scratch = down_pd.scratchpad_desc().get_size();
    s.up_format = packed_format(up_pd.weights_desc(), up_formats_, w_in_packed_, w_in_plain_);
    s.down_format =
        packed_format(down_pd.weights_desc(), down_formats_, w_out_packed_, w_out_plain_);
    s.src = dnnl::memory(s.src_md, engine_, nullptr);
    s.hidden = dnnl::memory(s.hidden_md, engine_, nullptr);
    s.dst = dnnl::memory(s.dst_md, engine_, nullptr);
    impl_ = std::string(up_pd.impl_info_str()) + " / " + down_pd.impl_info_str();
    return cache.emplace(m, std::move(s)).first->second;
  }

  // Threads take whole experts (dynamic), each with its own scratchpad and hidden buffer.
  void run_experts_per_thread() {
    const int d_model = shape_.d_model, d_ff = shape_.d_ff, experts = shape_.experts;
    const std::size_t elem = wdt_ == dt::bf16 ? 2 : 4;
    // Primitives (and their scratchpad sizes) are created outside the region.
    std::size_t scratch_bytes = 0;
    for (int e = 0; e < experts; ++e) {
      const int m = offsets_[e + 1] - offsets_[e];
      if (m == 0) continue;
      ExpertSteps& s = expert_steps(m);
      scratch_bytes = std::max({scratch_bytes, s.up_scratch, s.down_scratch});
    }
    for (std::size_t t = 0; t < scratch_.size(); ++t)
      scratchpad(static_cast<int>(t), scratch_bytes);
#pragma omp parallel
    {
      const int id = omp_get_thread_num();
      dnnl::stream stream(engine_);
#pragma omp for schedule(dynamic, 1)
      for (int e = 0; e < experts; ++e) {
        const int m = offsets_[e + 1] - offsets_[e];
        if (m == 0) continue;
        const ExpertSteps& s = thread_steps_.find(m)->second;
        std::vector<char>& hidden = hidden_thread_[id];
        if (hidden.size() < static_cast<std::size_t>(m) * d_ff * elem) {
          hidden.resize(static_cast<std::size_t>(m) * d_ff * elem);
        }
        dnnl::memory src(s.src_md, engine_,
                         xg_.data() + static_cast<std::size_t>(offsets_[e]) * d_model * elem);
        dnnl::memory hid(s.hidden_md, engine_, hidden.data());
        dnnl::memory dst(s.dst_md, engine_,
                         yg_.data() + static_cast<std::size_t>(offsets_[e]) * d_model);
        s.up.execute(stream, {{DNNL_ARG_SRC, src},
                              {DNNL_ARG_WEIGHTS, w_in_packed_[e][s.up_format]},
                              {DNNL_ARG_DST, hid},
                              {DNNL_ARG_SCRATCHPAD, scratch_[id]}});
        s.down.execute(stream, {{DNNL_ARG_SRC, hid},
                                {DNNL_ARG_WEIGHTS, w_out_packed_[e][s.down_format]},
                                {DNNL_ARG_DST, dst},
                                {DNNL_ARG_SCRATCHPAD, scratch_[id]}});
      }
    }
  }

 public:
  const std::string& impl() const { return impl_; }

 private:
  MoeShape shape_;
  dt wdt_;
  bool per_thread_;
  dnnl::engine engine_;
  dnnl::stream stream_;
  Matrix<float> router_;  // [d_model, experts]
  std::vector<dnnl::memory> w_in_plain_, w_out_plain_;
  std::vector<dnnl::memory::desc> up_formats_, down_formats_;
  std::vector<std::vector<dnnl::memory>> w_in_packed_, w_out_packed_;  // [expert][format]
  std::map<int, RouterStep> router_steps_;
  std::map<int, ExpertSteps> steps_, thread_steps_;
  std::vector<dnnl::memory> scratch_;
  std::vector<std::vector<char>> hidden_thread_;
  Matrix<float> logits_;
  std::vector<int> choice_, row_of_, offsets_, fill_;
  std::vector<float> gate_;
  std::vector<char> xg_, hidden_;
  std::vector<float> yg_;
  std::string impl_;
};

// ---------------------------------------------------------------------------------------------
struct Options {
  int reps = 0;  // 0: by token count
  std::vector<int> tokens{1, 8, 64, 512, 2048};
  std::vector<std::string> precisions{"fp32", "bf16"};
  bool many_experts = false;
  std::string json;
  std::string schedule = "auto";  // switchmoe's expert schedule: auto, split or whole
  bool ab_schedule = false;       // also time switchmoe whole-FFN vs split-tiles, interleaved
  bool only_many = false;         // --many_experts without the 8-expert cases
  bool ab_rows = false;           // also time switchmoe with / without balanced row tiles
  std::string profile;            // --profile switchmoe|onednn: only that side, for perf record
};

struct Result {
  std::string precision, variant;
  int tokens, experts, d_model, d_ff, reps;
  bool cold;
  double switch_s, onednn_s, ratio, bytes, bandwidth, switch_bw, onednn_bw, max_diff;
  double switch_warm_s = 0.0, onednn_warm_s = 0.0;
};

using switchmoe_bench::random_matrix;

template <class Policy>
void run_precision(const char* precision, const MoeShape& shape, bool per_thread,
                   const std::vector<int>& token_counts, const Options& options, ReadProbe& probe,
                   std::vector<Result>& results) {
  switchmoe::SwitchLayer<Policy> layer(
      switchmoe_bench::dropless_config(shape.experts, shape.d_model, shape.d_ff));
  layer.sync_weights();
  std::vector<const Matrix<float>*> w_in, w_out;
  auto& bank =
      static_cast<const typename switchmoe::SwitchLayer<Policy>::Experts&>(layer.experts());
  for (int e = 0; e < shape.experts; ++e) {
    w_in.push_back(&bank.w_in(e));
    w_out.push_back(&bank.w_out(e));
  }
  const Matrix<float> router =
      static_cast<const switchmoe::Router<Policy>&>(layer.router()).weight();
  OnednnMoe moe(shape, std::is_same_v<Policy, switchmoe::Bf16>, per_thread, router, w_in, w_out);
  const double elem = std::is_same_v<Policy, switchmoe::Bf16> ? 2.0 : 4.0;
  for (int tokens : token_counts) {
    const Matrix<float> x = random_matrix(tokens, shape.d_model, 100 + tokens);
    switchmoe::SwitchOutput out;
    Matrix<float> y;
    layer.forward(x, switchmoe::Mode::kEval, out);  // warm-up: buffers, primitives, packing
    moe.forward(x, y);
    const double max_diff = (out.y - y).cwiseAbs().maxCoeff();
    std::vector<int> touched(shape.experts, 0);
    for (Eigen::Index t = 0; t < tokens; ++t) touched[out.routing.expert(t, 0)] = 1;
    const double bytes =
        2.0 * shape.d_model * shape.d_ff * elem * std::count(touched.begin(), touched.end(), 1);
    const bool cold = tokens <= 64;
    const int reps = options.reps > 0 ? options.reps : tokens >= 2048 ? 7 : tokens >= 512 ? 11 : 31;
    if (!options.profile.empty()) {  // one side only, warm, so that a profile sees only it
      std::vector<double> t;
      for (int rep = 0; rep < reps; ++rep) {
        const auto start = Clock::now();
        if (options.profile == "switchmoe") {
          layer.forward(x, switchmoe::Mode::kEval, out);
        } else {
          moe.forward(x, y);
        }
        t.push_back(seconds_since(start));
      }
      std::printf("| %s | profile %s | %d | median %.3f ms |\n", precision, options.profile.c_str(),
                  tokens, median(t) * 1e3);
      continue;
    }
    std::vector<double> ts, to, ratio, bw, ts_warm, to_warm, schedule_ratio, rows_ratio;
    for (int rep = 0; rep < reps; ++rep) {
      double t_switch = 0.0, t_onednn = 0.0;
      if (cold) {
        flush_process_caches();
        bw.push_back(probe.run(static_cast<std::size_t>(bytes)));
      }
      for (int side = 0; side < 2; ++side) {
        const bool switch_side = (side == 0) == (rep % 2 == 0);
        // Cold cases: the first call reads everything from memory; a second call right after it
        // (warm: the touched weights still in the caches) shows what the caches would give.
        for (int pass = 0; pass < (cold ? 2 : 1); ++pass) {
          if (cold && pass == 0) flush_process_caches();
          const auto start = Clock::now();
          if (switch_side) {
            layer.forward(x, switchmoe::Mode::kEval, out);
            (pass == 0 ? t_switch : ts_warm.emplace_back()) = seconds_since(start);
          } else {
            moe.forward(x, y);
            (pass == 0 ? t_onednn : to_warm.emplace_back()) = seconds_since(start);
          }
        }
      }
      ts.push_back(t_switch);
      to.push_back(t_onednn);
      ratio.push_back(t_switch / t_onednn);
      if (options.ab_schedule) {
        // switchmoe alone, whole-FFN against split-tiles schedule, order flipping per rep.
        double t_whole = 0.0, t_split = 0.0;
        for (int side = 0; side < 2; ++side) {
          const bool whole = (side == 0) == (rep % 2 == 0);
          switchmoe::detail::forced_ffn_schedule() =
              whole ? switchmoe::detail::FfnSchedule::kWholeFfns
                    : switchmoe::detail::FfnSchedule::kSplitTiles;
          if (cold) flush_process_caches();
          const auto start = Clock::now();
          layer.forward(x, switchmoe::Mode::kEval, out);
          (whole ? t_whole : t_split) = seconds_since(start);
        }
        switchmoe::detail::forced_ffn_schedule() = switchmoe::detail::FfnSchedule::kAuto;
        schedule_ratio.push_back(t_whole / t_split);
      }
      if (options.ab_rows) {
        // switchmoe alone, balanced row tiles on or off (a speed switch of the kernels, never a
        // change of results), order flipping per rep.
        double t_on = 0.0, t_off = 0.0;
        for (int side = 0; side < 2; ++side) {
          const bool on = (side == 0) == (rep % 2 == 0);
          switchmoe::kernels::detail::balanced_row_tiles() = on;
          if (cold) flush_process_caches();
          const auto start = Clock::now();
          layer.forward(x, switchmoe::Mode::kEval, out);
          (on ? t_on : t_off) = seconds_since(start);
        }
        switchmoe::kernels::detail::balanced_row_tiles() = true;
        rows_ratio.push_back(t_on / t_off);
      }
    }
    if (options.ab_rows) {
      std::printf("| %s | balanced / kMr row tiles | %d | %d x %d x %d | median ratio %.3f |\n",
                  precision, tokens, shape.experts, shape.d_model, shape.d_ff, median(rows_ratio));
    }
    if (options.ab_schedule) {
      std::printf("| %s | whole / split schedule | %d | %d x %d x %d | median ratio %.3f |\n",
                  precision, tokens, shape.experts, shape.d_model, shape.d_ff,
                  median(schedule_ratio));
    }
    Result r{precision,
             per_thread ? "onednn_per_thread" : "onednn",
             tokens,
             shape.experts,
             shape.d_model,
             shape.d_ff,
             reps,
             cold,
             median(ts),
             median(to),
             median(ratio),
             bytes,
             cold ? median(bw) : 0.0,
             0.0,
             0.0,
             max_diff};
    auto percent = [](double f) { return std::to_string(static_cast<int>(100 * f + 0.5)) + "%"; };
    auto ms = [](double s) {
      char text[32];
      std::snprintf(text, sizeof text, "%.3f", s * 1e3);
      return std::string(text);
    };
    if (cold) {
      r.switch_bw = bytes / r.switch_s / r.bandwidth;
      r.onednn_bw = bytes / r.onednn_s / r.bandwidth;
      r.switch_warm_s = median(ts_warm);
      r.onednn_warm_s = median(to_warm);
    }
    std::printf(
        "| %s | %s | %d | %d x %d x %d | %.3f | %.3f | %.3f | %s | %s | %s | %s | %s | %.2g |\n",
        precision, r.variant.c_str(), tokens, shape.experts, shape.d_model, shape.d_ff,
        r.switch_s * 1e3, r.onednn_s * 1e3, r.ratio,
        cold ? (std::to_string(static_cast<int>(r.bandwidth / 1e9 + 0.5)) + " GB/s").c_str() : "-",
        cold ? percent(r.switch_bw).c_str() : "-", cold ? percent(r.onednn_bw).c_str() : "-",
        cold ? ms(r.switch_warm_s).c_str() : "-", cold ? ms(r.onednn_warm_s).c_str() : "-",
        max_diff);
    std::fflush(stdout);
    results.push_back(r);
  }
  std::fprintf(stderr, "oneDNN %s implementation: %s\n", precision, moe.impl().c_str());
}

// Issue 15's per-token target: switchmoe's forward with 128 experts against 8 experts at
// 512 x 2048 and 2048 tokens (same tokens, so the time ratio is the per-token ratio),
// interleaved in one process (the order flips every repetition); median of the ratios.
template <class Policy>
void run_experts_ratio(const char* precision, int reps) {
  auto make = [](int experts) {
    return switchmoe::SwitchLayer<Policy>(switchmoe_bench::dropless_config(experts, 512, 2048));
  };
  switchmoe::SwitchLayer<Policy> few = make(8), many = make(128);
  const Matrix<float> x = random_matrix(2048, 512, 2148);
  switchmoe::SwitchOutput out;
  few.forward(x, switchmoe::Mode::kEval, out);  // warm-up: buffers, packing
  many.forward(x, switchmoe::Mode::kEval, out);
  std::vector<double> t_few, t_many, ratio;
  for (int rep = 0; rep < reps; ++rep) {
    double t[2] = {0.0, 0.0};
    for (int side = 0; side < 2; ++side) {
      const int which = (side + rep) % 2;  // 0: 8 experts, 1: 128
      const auto start = Clock::now();
      (which == 0 ? few : many).forward(x, switchmoe::Mode::kEval, out);
      t[which] = seconds_since(start);
    }
    t_few.push_back(t[0]);
    t_many.push_back(t[1]);
    ratio.push_back(t[1] / t[0]);
  }
  std::printf(
      "| %s | 128 vs 8 experts, time per token | 2048 | 512 x 2048 | 8 experts %.3f ms | 128 "
      "experts %.3f ms | median ratio %.3f |\n",
      precision, median(t_few) * 1e3, median(t_many) * 1e3, median(ratio));
  std::fflush(stdout);
}

std::vector<int> parse_ints(const std::string& s) {
  std::vector<int> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) v.push_back(std::stoi(item));
  return v;
}

std::vector<std::string> parse_words(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) v.push_back(item);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--reps" && has_value) {
      options.reps = std::stoi(argv[++i]);
    } else if (arg == "--tokens" && has_value) {
      options.tokens = parse_ints(argv[++i]);
    } else if (arg == "--precision" && has_value) {
      options.precisions = parse_words(argv[++i]);
    } else if (arg == "--schedule" && has_value) {
      options.schedule = argv[++i];
    } else if (arg == "--ab_schedule") {
      options.ab_schedule = true;
    } else if (arg == "--many_experts") {
      options.many_experts = true;
    } else if (arg == "--only_many_experts") {
      options.many_experts = options.only_many = true;
    } else if (arg == "--ab_rows") {
      options.ab_rows = true;
    } else if (arg == "--profile" && has_value &&
               (std::string(argv[i + 1]) == "switchmoe" || std::string(argv[i + 1]) == "onednn")) {
      options.profile = argv[++i];
    } else if (arg == "--json" && has_value) {
      options.json = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--reps N] [--tokens 1,8,...] [--precision fp32,bf16] "
                   "[--many_experts | --only_many_experts] [--schedule auto|split|whole] "
                   "[--ab_schedule] [--ab_rows] [--profile switchmoe|onednn] [--json FILE]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!options.profile.empty() &&
      (!options.json.empty() || options.ab_rows || options.ab_schedule)) {
    std::fprintf(stderr,
                 "%s: --profile runs one side only; it records no results for --json "
                 "and no A/B (--ab_rows, --ab_schedule)\n",
                 argv[0]);
    return 2;
  }
  // A hook of the library's tests: forcing a schedule changes the speed, never the results.
  switchmoe::detail::forced_ffn_schedule() =
      options.schedule == "split"   ? switchmoe::detail::FfnSchedule::kSplitTiles
      : options.schedule == "whole" ? switchmoe::detail::FfnSchedule::kWholeFfns
                                    : switchmoe::detail::FfnSchedule::kAuto;
  ReadProbe probe(std::size_t{160} << 20);  // the most bytes a cold call reads: 8 fp32 experts
  std::printf(
      "threads: %d; times are medians in ms; ratio = median of switchmoe / oneDNN per "
      "repetition; cold cases (tokens <= 64) flush every cache line of the process before the "
      "probe and before each timed call; %% bw = touched weight bytes / time / probe read "
      "bandwidth (the probe reads as many bytes, from memory); warm = the same call repeated "
      "at once (weights cached)\n\n",
      omp_get_max_threads());
  std::printf(
      "| precision | vs | tokens | experts x d_model x d_ff | switchmoe ms | oneDNN ms | "
      "ratio | probe read | switchmoe %% bw | oneDNN %% bw | switchmoe warm ms | oneDNN warm ms "
      "| max abs dy |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::vector<Result> results;
  const MoeShape shape{768, 3072, 8};
  for (const std::string& p : options.only_many ? std::vector<std::string>{} : options.precisions) {
    if (p == "fp32") {
      run_precision<switchmoe::Fp32>("fp32", shape, false, options.tokens, options, probe, results);
    } else if (p == "bf16") {
      run_precision<switchmoe::Bf16>("bf16", shape, false, options.tokens, options, probe, results);
    }
  }
  if (options.many_experts) {
    for (const std::string& p : options.precisions) {
      const int reps = options.reps > 0 ? options.reps : 7;
      if (p == "fp32") run_experts_ratio<switchmoe::Fp32>("fp32", reps);
      if (p == "bf16") run_experts_ratio<switchmoe::Bf16>("bf16", reps);
    }
    const MoeShape many{512, 2048, 128};
    for (const std::string& p : options.precisions) {
      for (bool per_thread : {false, true}) {
        if (p == "fp32") {
          run_precision<switchmoe::Fp32>("fp32", many, per_thread, {2048}, options, probe, results);
        } else if (p == "bf16") {
          run_precision<switchmoe::Bf16>("bf16", many, per_thread, {2048}, options, probe, results);
        }
      }
    }
  }
  // bf16 against fp32 decode: it reads half the bytes, so at the bandwidth limit it is 2x.
  for (const Result& a : results) {
    for (const Result& b : results) {
      if (a.precision == "fp32" && b.precision == "bf16" && a.cold && b.cold &&
          a.tokens == b.tokens && a.experts == b.experts && a.variant == b.variant) {
        std::printf("bf16 speed / fp32 speed, %d token(s), cold: switchmoe %.2fx, oneDNN %.2fx\n",
                    a.tokens, a.switch_s / b.switch_s, a.onednn_s / b.onednn_s);
      }
    }
  }
  if (!options.json.empty()) {
    std::FILE* f = std::fopen(options.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", options.json.c_str());
      return 1;
    }
    std::fprintf(f, "[\n");
    for (std::size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(
          f,
          "  {\"precision\": \"%s\", \"variant\": \"%s\", \"threads\": %d, \"tokens\": %d, "
          "\"experts\": "
          "%d, \"d_model\": %d, \"d_ff\": %d, \"reps\": %d, \"cold\": %s, "
          "\"switchmoe_s\": %.6g, \"onednn_s\": %.6g, \"ratio\": %.4f, \"bytes\": %.6g, "
          "\"read_bandwidth\": %.6g, \"switchmoe_bw_fraction\": %.4f, "
          "\"onednn_bw_fraction\": %.4f, \"switchmoe_warm_s\": %.6g, \"onednn_warm_s\": %.6g, "
          "\"max_abs_diff\": %.3g}%s\n",
          r.precision.c_str(), r.variant.c_str(), omp_get_max_threads(), r.tokens, r.experts,
          r.d_model, r.d_ff, r.reps, r.cold ? "true" : "false", r.switch_s, r.onednn_s, r.ratio,
          r.bytes, r.bandwidth, r.switch_bw, r.onednn_bw, r.switch_warm_s, r.onednn_warm_s,
          r.max_diff, i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "]\n");
    std::fclose(f);
  }
  std::fprintf(stderr, "probe checksum %g\n", probe.sink());
  return 0;
}
