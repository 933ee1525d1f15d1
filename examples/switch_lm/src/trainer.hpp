#pragma once
// One training run of a language model (dense, Switch, or a distilled student): data, model,
// optimizer, timing, evaluation, and the curve of validation loss.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <switchmoe/switchmoe.hpp>
#include <vector>

#include "checkpoint.hpp"
#include "cross_entropy.hpp"
#include "feed_forward.hpp"
#include "language_model.hpp"
#include "optimizer.hpp"
#include "ranks.hpp"
#include "text_data.hpp"

namespace switch_lm {

struct TrainConfig {
  int steps = 4000;
  int batch = 32;
  double lr = 3e-3;
  int warmup = 100;
  double final_lr_fraction = 0.1;
  AdamWConfig adamw;
  double clip_norm = 1.0;
  int eval_interval = 100;
  int eval_tokens = 16384;
};

// Switch layers replace the FFN of every other block (blocks 1, 3, ...), paper section 2.
struct SwitchSettings {
  int experts = 16;
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;
  float aux_loss_coef = 0.01f;
  float z_loss_coef = 0.0f;
  float jitter_eps = 0.01f;
  double router_lr_scale = 1.0;  // learning-rate multiplier of the routers
  int group_size = 0;            // routing group tokens (0: each call's tokens, per rank)
  bool expert_weight_decay = true;
};

// What the paper's ablations vary besides the Switch settings (paper.sh, paper section 2.4 and
// Tables 1-4). The defaults are the demonstration's: top-1, capacity, init scale 0.1, no dropout.
struct Variant {
  int top_k = 1;            // --top-k: experts per token (2: the MoE top-2 baseline of Table 1)
  bool dropless = false;    // --dropless: no expert capacity, nothing dropped
  float init_scale = 0.1f;  // --init-scale: SEMANTICS 11's s, for every weight of the model
  float dropout = 0.0f;     // --dropout: on the hidden activation of every dense FFN
  float expert_dropout = -1.0f;  // --expert-dropout: inside the experts (< 0: same as dropout)

  float expert_dropout_or_default() const {
    return expert_dropout < 0.0f ? dropout : expert_dropout;
  }
};

// Routing statistics of a whole training run (paper.sh's stability and drop columns).
struct TrainingStats {
  double dropped_sum = 0.0;     // dropped fraction summed over Switch layer calls
  double entropy_sum = 0.0;     // mean router entropy (nats) summed over Switch layer calls
  long long layer_calls = 0;    // Switch layer training calls
  int loss_spikes = 0;          // steps whose training loss exceeded the running mean by > 0.3 bits
  double max_train_bits = 0.0;  // largest training loss after warm-up
  double ema_bits = 0.0;        // running mean (exponential, 0.05) of the training loss
  bool finite = true;           // every training loss was finite

  // Called once per step with its training loss in bits per byte.
  void add_step(int step, int warmup, double loss_bits) {
    if (!std::isfinite(loss_bits)) finite = false;
    if (step == 1) ema_bits = loss_bits;
    if (step > std::max(warmup, 20)) {
      if (loss_bits > ema_bits + kSpikeBits) ++loss_spikes;
      max_train_bits = std::max(max_train_bits, loss_bits);
    }
    ema_bits += 0.05 * (loss_bits - ema_bits);
  }
  double dropped_fraction() const { return layer_calls ? dropped_sum / layer_calls : 0.0; }
  double router_entropy() const { return layer_calls ? entropy_sum / layer_calls : 0.0; }

  static constexpr double kSpikeBits = 0.3;
};

struct EvalPoint {
  int step = 0;
  double tokens = 0.0;      // training tokens seen
  double seconds = 0.0;     // training wall-clock (evaluation excluded)
  double train_bits = 0.0;  // mean training loss since the previous point, bits/byte
  double valid_bits = 0.0;  // validation loss, bits/byte
};

inline double bits(double nats) { return nats / std::log(2.0); }

// Samples `length` bytes after `prompt` from `model` (temperature sampling, evaluation mode).
template <class Model>
std::string generate_text(Model& model, const std::string& prompt, int length, double temperature,
                          std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> context(prompt.begin(), prompt.end());
  for (auto& c : context) c = static_cast<unsigned char>(c);
  std::string out;
  const int window = model.config().context;
  for (int i = 0; i < length; ++i) {
    const int start = std::max(0, static_cast<int>(context.size()) - window);
    const std::vector<int> input(context.begin() + start, context.end());
    const int seq = static_cast<int>(input.size());
    const MatrixX<float> logits = model.forward(input, 1, seq, switchmoe::Mode::kEval);
    std::vector<double> weights(static_cast<std::size_t>(logits.cols()));
    const float max = logits.row(seq - 1).maxCoeff();
    for (Eigen::Index v = 0; v < logits.cols(); ++v)
      weights[static_cast<std::size_t>(v)] = std::exp((logits(seq - 1, v) - max) / temperature);
    std::discrete_distribution<int> pick(weights.begin(), weights.end());
    const int next = pick(rng);
    context.push_back(next);
    out.push_back(static_cast<char>(next));
  }
  return out;
}

template <class Policy>
class Run {
 public:
  using Model = LanguageModel<float, FeedForward<Policy>>;

  Run(std::string name, const ModelConfig& model_config, const TrainConfig& train,
      std::optional<SwitchSettings> moe, std::uint64_t seed, const TextData& data,
      const Ranks& ranks = Ranks(), const Variant& variant = Variant())
      : name_(std::move(name)),
        ranks_(ranks),
        train_(train),
        moe_(moe),
        data_(data),
        model_(build_model(model_config, moe, seed, ranks, variant)),
        optimizer_(train.adamw),
        schedule_{train.lr, train.warmup, train.steps, train.final_lr_fraction},
        sampler_(data.train, train.batch, model_config.context, seed),
        valid_offsets_(validation_offsets(data.valid.size(), model_config.context,
                                          static_cast<std::size_t>(train.eval_tokens))) {
    if (moe_) loads_.resize(static_cast<std::size_t>(model_config.layers));
    top_k_ = variant.top_k;
  }

  // The model a run of these settings starts from (a Switch model when `moe` is given).
  // With `ranks` enabled, its Switch layers hold this rank's experts (construction is collective).
  static Model build_model(const ModelConfig& model_config,
                           const std::optional<SwitchSettings>& moe, std::uint64_t seed,
                           const Ranks& ranks = Ranks(), const Variant& variant = Variant()) {
    Model model(model_config, seed, [&](int layer, std::mt19937_64&) {
      return make_feed_forward(model_config, moe, seed, layer, ranks, variant);
    });
    // --init-scale s: the library layers draw with std sqrt(s / fan_in) (SEMANTICS 11); the
    // model's own weights (embeddings, attention, head: std 0.02 at the default s = 0.1) are
    // scaled alike, by sqrt(s / 0.1), so that s = 1.0 is the paper's 10x scale everywhere.
    if (variant.init_scale != Variant().init_scale) {
      const float factor = std::sqrt(static_cast<float>(variant.init_scale) / Variant().init_scale);
      for (auto& p : model.parameters()) {
        const bool library = p.name.find(".ffn.") != std::string::npos;
        const bool drawn = p.weight_decay || p.name.find("embedding") != std::string::npos;
        if (!library && drawn) *p.value *= factor;
      }
    }
    return model;
  }

  const std::string& name() const { return name_; }
  Model& model() { return model_; }
  bool is_switch() const { return moe_.has_value(); }
  const std::vector<EvalPoint>& curve() const { return curve_; }
  double train_seconds() const { return train_seconds_; }
  double train_tokens() const { return train_tokens_; }
  double tokens_per_second() const {
    return train_seconds_ > 0 ? train_tokens_ / train_seconds_ : 0.0;
  }
  double last_train_bits() const { return last_train_bits_; }
  const TrainingStats& training_stats() const { return stats_; }
  // Weight of the teacher's soft targets when trained with a teacher (distillation).
  double teacher_weight() const { return teacher_weight_; }
  void set_teacher_weight(double w) { teacher_weight_ = w; }

  // One optimizer step. With a teacher, the target mixes the labels with the teacher's
  // distribution (weight teacher_weight on the teacher), paper section 4.2.
  void train_step(int step, Run* teacher = nullptr, double teacher_weight = 0.0) {
    const auto start = std::chrono::steady_clock::now();
    const int seq = model_.config().context;
    sampler_.next(inputs_, targets_);
    // Expert parallel: every rank draws the whole batch (the same stream) and takes its slice of
    // the sequences; the slices in rank order are the single-process batch.
    int batch = train_.batch;
    if (ranks_.enabled) {
      const std::size_t first = ranks_.begin(static_cast<std::size_t>(train_.batch));
      const std::size_t last = ranks_.end(static_cast<std::size_t>(train_.batch));
      const std::size_t s = static_cast<std::size_t>(seq);
      inputs_.assign(inputs_.begin() + first * s, inputs_.begin() + last * s);
      targets_.assign(targets_.begin() + first * s, targets_.begin() + last * s);
      batch = static_cast<int>(last - first);
    }
    MatrixX<float> teacher_probs;
    if (teacher) {
      teacher_probs =
          softmax_rows(teacher->model_.forward(inputs_, batch, seq, switchmoe::Mode::kEval));
    }
    model_.zero_grad();
    const MatrixX<float> logits = model_.forward(inputs_, batch, seq, switchmoe::Mode::kTrain);
    auto ce = softmax_cross_entropy(logits, targets_, true, teacher ? &teacher_probs : nullptr,
                                    teacher_weight);
    const double global_tokens = static_cast<double>(train_.batch) * seq;
    double hard_loss = ce.hard_loss;
    if (ranks_.enabled) {
      // The loss is the mean over the whole batch's tokens: this rank's mean weighs n_r / N.
      const double weight = static_cast<double>(targets_.size()) / global_tokens;
      ce.d_logits *= static_cast<float>(weight);
      hard_loss = ranks_.sum(ce.hard_loss * weight);
    }
    model_.backward(ce.d_logits);
    ParamList<float> params = model_.parameters();
    ranks_.allreduce_replicated(params);
    if (moe_) {
      for (auto& p : params) {
        if (p.owner == switchmoe::ParameterOwner::kRouter) p.lr_scale = moe_->router_lr_scale;
        if (p.owner == switchmoe::ParameterOwner::kExpert)
          p.weight_decay &= moe_->expert_weight_decay;
      }
    }
    if (ranks_.enabled) {
      clip_global_grad_norm(params);
    } else {
      clip_grad_norm(params, train_.clip_norm);
    }
    optimizer_.step(params, schedule_.at(step));
    train_seconds_ +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    train_tokens_ += global_tokens;
    last_train_bits_ = bits(hard_loss);
    train_bits_sum_ += last_train_bits_;
    ++train_bits_count_;
    stats_.add_step(step, train_.warmup, last_train_bits_);
    if (moe_) {
      for (std::size_t i = 0; i < model_.blocks().size(); ++i) {
        auto& ffn = model_.blocks()[i].feed_forward();
        if (!ffn.is_switch()) continue;
        loads_[i].accumulate(ffn.load());
        stats_.dropped_sum += ffn.load().stats.dropped_fraction;
        stats_.entropy_sum += ffn.router_entropy();
        ++stats_.layer_calls;
      }
    }
  }

  // Validation loss in bits per byte over the fixed validation windows (evaluation mode).
  double validation_bits() {
    const int seq = model_.config().context;
    double total = 0.0;
    std::size_t tokens = 0;
    std::vector<int> inputs, targets;
    for (std::size_t first = 0; first < valid_offsets_.size();
         first += static_cast<std::size_t>(train_.batch)) {
      std::size_t count = std::min<std::size_t>(static_cast<std::size_t>(train_.batch),
                                                valid_offsets_.size() - first);
      // Expert parallel: this rank's contiguous share of the batch's windows.
      const std::size_t begin = first + ranks_.begin(count);
      count = ranks_.end(count) - ranks_.begin(count);
      inputs.clear();
      targets.clear();
      for (std::size_t w = begin; w < begin + count; ++w) {
        for (int t = 0; t < seq; ++t) {
          inputs.push_back(data_.valid[valid_offsets_[w] + static_cast<std::size_t>(t)]);
          targets.push_back(data_.valid[valid_offsets_[w] + static_cast<std::size_t>(t) + 1]);
        }
      }
      const MatrixX<float> logits =
          model_.forward(inputs, static_cast<int>(count), seq, switchmoe::Mode::kEval);
      if (!targets.empty()) {
        total += softmax_cross_entropy(logits, targets, false).loss *
                 static_cast<double>(targets.size());
      }
      tokens += targets.size();
    }
    std::vector<double> sums{total, static_cast<double>(tokens)};
    ranks_.sum(sums);
    return bits(sums[0] / sums[1]);
  }

  // Evaluates and appends a point to the curve; returns it.
  const EvalPoint& evaluate(int step) {
    EvalPoint point;
    point.step = step;
    point.tokens = train_tokens_;
    point.seconds = train_seconds_;
    point.train_bits = train_bits_count_ ? train_bits_sum_ / train_bits_count_ : 0.0;
    point.valid_bits = validation_bits();
    train_bits_sum_ = 0.0;
    train_bits_count_ = 0;
    curve_.push_back(point);
    return curve_.back();
  }

  // Expert load accumulated since the last call, per Switch layer (block index, load); resets it.
  std::vector<std::pair<int, ExpertLoad>> take_expert_loads() {
    std::vector<std::pair<int, ExpertLoad>> out;
    for (std::size_t i = 0; i < loads_.size(); ++i) {
      if (loads_[i].calls > 0) out.emplace_back(static_cast<int>(i), loads_[i]);
      loads_[i] = ExpertLoad{};
    }
    return out;
  }

  // Expert parallel: the experts of every rank are counted (each lives on its owner only).
  std::size_t parameter_count() {
    double replicated = 0.0, experts = 0.0;
    for (const auto& p : model_.parameters())
      (p.owner == switchmoe::ParameterOwner::kExpert ? experts : replicated) +=
          static_cast<double>(p.value->size());
    return static_cast<std::size_t>(replicated + ranks_.sum(experts));
  }

  // Parameters a token actually uses: one expert per Switch layer (paper: same FLOPs per token).
  std::size_t active_parameter_count() {
    double replicated = 0.0, first_expert = 0.0;  // expert 0 lives on rank 0
    for (const auto& p : model_.parameters()) {
      if (p.owner != switchmoe::ParameterOwner::kExpert)
        replicated += static_cast<double>(p.value->size());
      else if (p.expert == 0)
        first_expert += static_cast<double>(p.value->size());
    }
    return static_cast<std::size_t>(replicated + ranks_.sum(first_expert));
  }

  // Forward FLOPs per token (multiply-add = 2): projections, attention over the full context as
  // computed, FFN (one expert for a Switch layer, plus the router), output head. Training is ~3x.
  double forward_flops_per_token() const {
    const ModelConfig& c = model_.config();
    const double d = c.d_model, ff = c.d_ff, ctx = c.context;
    double per_layer = 2.0 * d * 3.0 * d + 2.0 * d * d + 2.0 * 2.0 * ctx * d + 2.0 * 2.0 * d * ff;
    double total = c.layers * per_layer + 2.0 * d * c.vocab;
    if (moe_) {
      total += switch_layer_count(c.layers) * 2.0 * d * moe_->experts;
      // top-k: k experts per token (the MoE top-2 baseline costs one more FFN per Switch layer).
      total += switch_layer_count(c.layers) * (top_k_ - 1) * 2.0 * 2.0 * d * ff;
    }
    return total;
  }

  static int switch_layer_count(int layers) { return layers / 2; }
  static bool is_switch_layer(int layer) { return layer % 2 == 1; }

  // Copies every parameter whose name and shape match (used to start a distilled student from the
  // teacher's non-expert weights, paper section 4.2). Returns how many tensors were copied.
  int copy_matching_parameters(Run& from) {
    int copied = 0;
    auto source = from.model_.parameters();
    for (auto& p : model_.parameters()) {
      for (const auto& q : source) {
        if (q.name == p.name && q.value->rows() == p.value->rows() &&
            q.value->cols() == p.value->cols()) {
          *p.value = *q.value;
          ++copied;
        }
      }
    }
    return copied;
  }

  // Samples `length` bytes after `prompt` (temperature sampling, evaluation mode).
  std::string generate(const std::string& prompt, int length, double temperature,
                       std::uint64_t seed) {
    return generate_text(model_, prompt, length, temperature, seed);
  }

  // Writes DIR/<name>.safetensors and DIR/<name>.adamw.safetensors (checkpoint.hpp) and returns
  // what state.json keeps of the run: everything besides the tensors that the next step reads.
  nlohmann::json save(const std::string& dir, int step) {
    save_model(model_, model_file(dir, name_), step);
    save_adamw(optimizer_, model_.parameters(), adamw_file(dir, name_), step);
    nlohmann::json state;
    state["sampler"] = sampler_.state();
    nlohmann::json streams = nlohmann::json::array();
    for (auto& block : model_.blocks()) {
      const StreamPositions s = block.feed_forward().stream_positions();
      streams.push_back({{"jitter_calls", s.jitter_calls}, {"dropout_calls", s.dropout_calls}});
    }
    state["streams"] = streams;
    state["train_seconds"] = train_seconds_;
    state["train_tokens"] = train_tokens_;
    state["train_bits_sum"] = train_bits_sum_;
    state["train_bits_count"] = train_bits_count_;
    state["last_train_bits"] = last_train_bits_;
    nlohmann::json curve = nlohmann::json::array();
    for (const EvalPoint& p : curve_)
      curve.push_back({p.step, p.tokens, p.seconds, p.train_bits, p.valid_bits});
    state["curve"] = curve;
    state["stats"] = {{"dropped_sum", stats_.dropped_sum},
                      {"entropy_sum", stats_.entropy_sum},
                      {"layer_calls", stats_.layer_calls},
                      {"loss_spikes", stats_.loss_spikes},
                      {"max_train_bits", stats_.max_train_bits},
                      {"ema_bits", stats_.ema_bits},
                      {"finite", stats_.finite}};
    return state;
  }

  // Restores what save() wrote at `step`; on any error (a missing or malformed file or entry, a
  // shape that does not match this run's model) the run is as before.
  void load(const std::string& dir, int step, const nlohmann::json& state) {
    // Everything is parsed and checked first; nothing below the model's load throws.
    std::string sampler;
    std::vector<StreamPositions> streams;
    std::vector<EvalPoint> curve;
    TrainingStats stats;  // a checkpoint of an older version has none: they restart
    with_state_errors(dir, [&] {
      if (state.contains("stats")) {
        const nlohmann::json& st = state.at("stats");
        stats.dropped_sum = st.at("dropped_sum").get<double>();
        stats.entropy_sum = st.at("entropy_sum").get<double>();
        stats.layer_calls = st.at("layer_calls").get<long long>();
        stats.loss_spikes = st.at("loss_spikes").get<int>();
        stats.max_train_bits = st.at("max_train_bits").get<double>();
        stats.ema_bits = st.at("ema_bits").get<double>();
        stats.finite = st.at("finite").get<bool>();
      }
      sampler = state.at("sampler").get<std::string>();
      BatchSampler(sampler_).set_state(sampler);  // checks it on a copy
      const nlohmann::json& saved = state.at("streams");
      if (!saved.is_array() || saved.size() != model_.blocks().size())
        throw std::runtime_error(state_file(dir) + ": run '" + name_ + "' has " +
                                 std::to_string(saved.size()) + " stream entries, expected " +
                                 std::to_string(model_.blocks().size()) + " (one per block)");
      for (const auto& s : saved)
        streams.push_back({s.at("jitter_calls").get<std::uint64_t>(),
                           s.at("dropout_calls").get<std::uint64_t>()});
      for (const auto& p : state.at("curve"))
        curve.push_back({p.at(0).get<int>(), p.at(1).get<double>(), p.at(2).get<double>(),
                         p.at(3).get<double>(), p.at(4).get<double>()});
    });
    const auto number = [&](const char* key) {
      return with_state_errors(dir, [&] { return state.at(key).get<double>(); });
    };
    const double seconds = number("train_seconds"), tokens = number("train_tokens");
    const double bits_sum = number("train_bits_sum"), last_bits = number("last_train_bits");
    const int bits_count =
        with_state_errors(dir, [&] { return state.at("train_bits_count").get<int>(); });
    AdamWState adamw = read_adamw(model_.parameters(), adamw_file(dir, name_), step);
    load_model(model_, model_file(dir, name_), step);
    optimizer_.restore(adamw.steps, std::move(adamw.m), std::move(adamw.v));
    for (std::size_t i = 0; i < streams.size(); ++i)
      model_.blocks()[i].feed_forward().set_stream_positions(streams[i]);
    sampler_.set_state(sampler);
    curve_ = std::move(curve);
    train_seconds_ = seconds;
    train_tokens_ = tokens;
    train_bits_sum_ = bits_sum;
    train_bits_count_ = bits_count;
    last_train_bits_ = last_bits;
    stats_ = stats;
  }

 private:
  // Clips by the norm of the whole model's gradient: the replicated tensors (identical on every
  // rank after the reduction) once, each expert on the rank that owns it.
  void clip_global_grad_norm(const ParamList<float>& params) {
    const double norm = std::sqrt(ranks_.global_grad_norm_squared(params));
    if (train_.clip_norm > 0.0 && norm > train_.clip_norm) {
      const float scale = static_cast<float>(train_.clip_norm / (norm + 1e-12));
      for (const auto& p : params) *p.grad *= scale;
    }
  }

  static FeedForward<Policy> make_feed_forward(const ModelConfig& c,
                                               const std::optional<SwitchSettings>& moe,
                                               std::uint64_t seed, int layer, const Ranks& ranks,
                                               const Variant& variant) {
    const std::uint64_t layer_seed = seed * 1000003ULL + static_cast<std::uint64_t>(layer) + 1;
    if (moe && is_switch_layer(layer)) {
      switchmoe::SwitchConfig config;
      config.d_model = c.d_model;
      config.d_ff = c.d_ff;
      config.routing.num_experts = moe->experts;
      config.routing.capacity_factor = moe->capacity_factor;
      config.routing.eval_capacity_factor = moe->eval_capacity_factor;
      config.aux_loss_coef = moe->aux_loss_coef;
      config.z_loss_coef = moe->z_loss_coef;
      config.jitter_eps = moe->jitter_eps;
      config.routing.group_size = moe->group_size;
      config.routing.top_k = variant.top_k;
      config.routing.dropless = variant.dropless;
      config.init_scale = variant.init_scale;
      config.expert_dropout = variant.expert_dropout_or_default();
      config.seed = layer_seed;
      return FeedForward<Policy>(config, ranks);
    }
    switchmoe::DenseConfig config;
    config.d_model = c.d_model;
    config.d_ff = c.d_ff;
    config.init_scale = variant.init_scale;
    config.dropout = variant.dropout;
    config.seed = layer_seed;
    return FeedForward<Policy>(config);
  }

  std::string name_;
  Ranks ranks_;
  TrainConfig train_;
  std::optional<SwitchSettings> moe_;
  const TextData& data_;
  Model model_;
  AdamW<float> optimizer_;
  LrSchedule schedule_;
  BatchSampler sampler_;
  std::vector<std::size_t> valid_offsets_;
  std::vector<int> inputs_, targets_;
  double train_seconds_ = 0.0, train_tokens_ = 0.0;
  double train_bits_sum_ = 0.0, last_train_bits_ = 0.0;
  int train_bits_count_ = 0;
  double teacher_weight_ = 0.0;
  std::vector<EvalPoint> curve_;
  std::vector<ExpertLoad> loads_;
  TrainingStats stats_;
  int top_k_ = 1;
};

}  // namespace switch_lm
