#pragma once
// Pre-LN residual transformer block:
//   h = x + Attention(LN1(x));  y = h + FeedForward(LN2(h)).
// FeedForward is a template parameter: the library's DenseFFN / SwitchLayer (through
// feed_forward.hpp) in the demo, Mlp<double> in the gradient checks.

#include <string>
#include <switchmoe/core/types.hpp>

#include "attention.hpp"
#include "layer_norm.hpp"
#include "tensor.hpp"

namespace switch_lm {

template <class T, class FeedForward>
class Block {
 public:
  Block(int features, int heads, FeedForward feed_forward, double init_std, double out_init_std,
        std::mt19937_64& rng)
      : ln_attention_("ln_attention", features),
        attention_(features, heads, init_std, out_init_std, rng),
        ln_feed_forward_("ln_feed_forward", features),
        feed_forward_(std::move(feed_forward)) {}

  // x: [batch * seq, features] -> [batch * seq, features]
  MatrixX<T> forward(const MatrixX<T>& x, int batch, int seq, switchmoe::Mode mode) {
    MatrixX<T> h = x + attention_.forward(ln_attention_.forward(x), batch, seq);
    h += feed_forward_.forward(ln_feed_forward_.forward(h), mode);
    return h;
  }

  MatrixX<T> backward(const MatrixX<T>& dy) {
    MatrixX<T> dh = dy + ln_feed_forward_.backward(feed_forward_.backward(dy));
    dh += ln_attention_.backward(attention_.backward(dh));
    return dh;
  }

  // The feed-forward layer's tensors are named prefix + kFeedForwardPrefix + its own names; without
  // `with_feed_forward` only the block's own tensors are listed.
  static constexpr const char* kFeedForwardPrefix = "ffn.";
  void parameters(ParamList<T>& out, const std::string& prefix, bool with_feed_forward = true) {
    ln_attention_.parameters(out, prefix);
    attention_.parameters(out, prefix);
    ln_feed_forward_.parameters(out, prefix);
    if (with_feed_forward) feed_forward_.parameters(out, prefix + kFeedForwardPrefix);
  }

  FeedForward& feed_forward() { return feed_forward_; }
  const FeedForward& feed_forward() const { return feed_forward_; }

 private:
  LayerNorm<T> ln_attention_;
  CausalSelfAttention<T> attention_;
  LayerNorm<T> ln_feed_forward_;
  FeedForward feed_forward_;
};

}  // namespace switch_lm
