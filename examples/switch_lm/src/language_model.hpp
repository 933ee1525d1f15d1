#pragma once
// Byte-level decoder-only transformer LM:
//   token embedding + learned positional embedding -> pre-LN blocks -> final LN -> untied output
//   projection to vocabulary logits.

#include <cmath>
#include <cstdint>
#include <string>
#include <switchmoe/core/types.hpp>
#include <vector>

#include "block.hpp"
#include "embedding.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"
#include "tensor.hpp"

namespace switch_lm {

struct ModelConfig {
  int vocab = 256;
  int context = 64;
  int d_model = 64;
  int layers = 4;
  int heads = 4;
  int d_ff = 256;
};

template <class T, class FeedForward>
class LanguageModel {
 public:
  using BlockType = Block<T, FeedForward>;
  static constexpr double kInitStd = 0.02;

  // make_feed_forward(layer, rng) -> FeedForward. Every non-feed-forward parameter is drawn from
  // one stream seeded by `seed`, in a fixed order, so two models that differ only in their
  // feed-forward layers (which seed themselves) start from identical embeddings and attention.
  template <class MakeFeedForward>
  LanguageModel(const ModelConfig& config, std::uint64_t seed, MakeFeedForward&& make_feed_forward)
      : config_(config),
        rng_(seed),
        token_embedding_(config.vocab, config.d_model, kInitStd, rng_),
        position_embedding_(config.context, config.d_model, kInitStd, rng_),
        final_ln_("final_ln", config.d_model),
        head_("head", config.d_model, config.vocab, false, kInitStd, rng_) {
    const double out_std = kInitStd / std::sqrt(2.0 * config.layers);
    blocks_.reserve(static_cast<std::size_t>(config.layers));
    for (int layer = 0; layer < config.layers; ++layer) {
      blocks_.emplace_back(config.d_model, config.heads, make_feed_forward(layer, rng_), kInitStd,
                           out_std, rng_);
    }
  }

  // tokens: [batch * seq] -> logits [batch * seq, vocab].
  MatrixX<T> forward(const std::vector<int>& tokens, int batch, int seq, switchmoe::Mode mode) {
    MatrixX<T> x = token_embedding_.forward(tokens) + position_embedding_.forward(batch, seq);
    for (auto& block : blocks_) x = block.forward(x, batch, seq, mode);
    return head_.forward(final_ln_.forward(x));
  }

  // After forward(..., kTrain): accumulates all gradients (the feed-forward layers add their
  // auxiliary-loss gradients themselves).
  void backward(const MatrixX<T>& d_logits) {
    MatrixX<T> dx = final_ln_.backward(head_.backward(d_logits));
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) dx = it->backward(dx);
    token_embedding_.backward(dx);
    position_embedding_.backward(dx);
  }

  // Fresh list on every call: the library marks its compute copies stale on this non-const access
  // (API.md), so the optimizer fetches the list before each update.
  ParamList<T> parameters() { return collect(true); }

  // The model's own tensors (embeddings, attention, norms, read-out), without the feed-forward
  // layers' (checkpoints save those through the library, under feed_forward_prefix(block)).
  ParamList<T> own_parameters() { return collect(false); }

  static std::string block_prefix(std::size_t block) {
    return "blocks." + std::to_string(block) + ".";
  }
  static std::string feed_forward_prefix(std::size_t block) {
    return block_prefix(block) + BlockType::kFeedForwardPrefix;
  }

  void zero_grad() {
    for (auto& p : parameters()) p.grad->setZero();
    for (auto& block : blocks_) block.feed_forward().zero_grad();
  }

  // Sum of the feed-forward layers' auxiliary losses of the last forward (already scaled).
  double aux_loss() const {
    double total = 0.0;
    for (const auto& block : blocks_) total += block.feed_forward().aux_loss();
    return total;
  }

  std::vector<BlockType>& blocks() { return blocks_; }
  const ModelConfig& config() const { return config_; }

 private:
  ParamList<T> collect(bool with_feed_forward) {
    ParamList<T> out;
    token_embedding_.parameters(out, "");
    position_embedding_.parameters(out, "");
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      blocks_[i].parameters(out, block_prefix(i), with_feed_forward);
    final_ln_.parameters(out, "");
    head_.parameters(out, "");
    return out;
  }

  ModelConfig config_;
  std::mt19937_64 rng_;
  TokenEmbedding<T> token_embedding_;
  PositionalEmbedding<T> position_embedding_;
  std::vector<BlockType> blocks_;
  LayerNorm<T> final_ln_;
  Linear<T> head_;
};

}  // namespace switch_lm
