#pragma once
// Command-line options of switch_lm.

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "language_model.hpp"
#include "trainer.hpp"

namespace switch_lm {

struct Options {
  ModelConfig model;
  TrainConfig train;
  SwitchSettings moe;
  std::string precision = "fp32";
  int threads =
      1;  // one thread is fastest for the default model (small matrices); 0: OpenMP default
  std::uint64_t seed = 1;
  std::string out = "switch_lm_out";
  std::string data;  // empty: the fortunes
  bool quick = false;
  double quick_max_bits = 4.5;  // --quick fails unless both runs end below this
  bool distill = false;
  double distill_teacher_weight = 0.25;  // paper section 4.2: 0.25 teacher / 0.75 hard labels
  int sample_bytes = 320;
  bool help = false;
};

inline const char* usage() {
  return R"(usage: switch_lm [options]
Trains a byte-level transformer LM twice on the same data, with dense FFNs and with Switch layers
(every other block) of the same FLOPs per token, and compares them.

data and output
  --data FILE              train on FILE (default: the Debian `fortunes` files)
  --out DIR                write curves.csv, curves.png, report.txt there (default switch_lm_out)
  --quick                  about a minute on 2 cores; fails unless both runs end below 4.5 bits/byte
model
  --d-model N --layers N --heads N --d-ff N --context N
Switch layers
  --experts N              experts per Switch layer
  --capacity-factor X      training capacity factor (evaluation uses --eval-capacity-factor)
  --eval-capacity-factor X
  --aux-coef X             load-balancing loss coefficient
  --z-coef X               router z-loss coefficient
  --jitter X               router input jitter epsilon
  --router-lr-scale X      learning-rate multiplier of the routers
  --expert-weight-decay 0|1  weight decay on the expert matrices
training
  --steps N --batch N --lr X --warmup N --final-lr-fraction X --weight-decay X --clip X
  --eval-interval N        steps between validation evaluations
  --eval-tokens N          validation tokens per evaluation
  --precision fp32|bf16    precision policy of the library layers
  --threads N              OpenMP threads (default 1: fastest for the default model's small
                           matrices; 0 = OpenMP default; deterministic for a given count)
  --seed N
distillation (paper section 4.2)
  --distill                distill the Switch model into a dense student and report the kept gain
  --distill-weight X       weight of the teacher's soft targets (default 0.25)
  --sample-bytes N         bytes of generated text per model
)";
}

inline void apply_quick_defaults(Options& o) {
  // The default model, trained for a tenth of the steps.
  o.quick = true;
  o.train.steps = 300;
  o.train.warmup = 30;
  o.train.eval_interval = 50;
  o.train.eval_tokens = 8192;
  o.sample_bytes = 160;
}

// Throws std::invalid_argument naming the option, its value and what was expected.
inline Options parse_options(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const auto& a : args)
    if (a == "--quick") apply_quick_defaults(o);
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string key = args[i], value;
    const auto eq = key.find('=');
    if (eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
    }
    auto next = [&]() -> std::string {
      if (eq != std::string::npos) return value;
      if (i + 1 >= args.size()) throw std::invalid_argument("option " + key + " expects a value");
      return args[++i];
    };
    auto integer = [&](int min) {
      const std::string v = next();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < min || n > 1000000000)
        throw std::invalid_argument("option " + key + " = '" + v +
                                    "': expected an integer >= " + std::to_string(min));
      return static_cast<int>(n);
    };
    auto real = [&](double min, bool inclusive) {
      const std::string v = next();
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(inclusive ? x >= min : x > min))
        throw std::invalid_argument("option " + key + " = '" + v + "': expected a number " +
                                    (inclusive ? ">= " : "> ") + std::to_string(min));
      return x;
    };
    if (key == "--help" || key == "-h")
      o.help = true;
    else if (key == "--quick") {
    } else if (key == "--distill")
      o.distill = true;
    else if (key == "--data")
      o.data = next();
    else if (key == "--out")
      o.out = next();
    else if (key == "--d-model")
      o.model.d_model = integer(1);
    else if (key == "--layers")
      o.model.layers = integer(1);
    else if (key == "--heads")
      o.model.heads = integer(1);
    else if (key == "--d-ff")
      o.model.d_ff = integer(1);
    else if (key == "--context")
      o.model.context = integer(2);
    else if (key == "--experts")
      o.moe.experts = integer(1);
    else if (key == "--capacity-factor")
      o.moe.capacity_factor = real(0.0, false);
    else if (key == "--eval-capacity-factor")
      o.moe.eval_capacity_factor = real(0.0, false);
    else if (key == "--aux-coef")
      o.moe.aux_loss_coef = static_cast<float>(real(0.0, true));
    else if (key == "--z-coef")
      o.moe.z_loss_coef = static_cast<float>(real(0.0, true));
    else if (key == "--router-lr-scale")
      o.moe.router_lr_scale = real(0.0, false);
    else if (key == "--expert-weight-decay")
      o.moe.expert_weight_decay = integer(0) != 0;
    else if (key == "--jitter")
      o.moe.jitter_eps = static_cast<float>(real(0.0, true));
    else if (key == "--steps")
      o.train.steps = integer(1);
    else if (key == "--batch")
      o.train.batch = integer(1);
    else if (key == "--lr")
      o.train.lr = real(0.0, false);
    else if (key == "--warmup")
      o.train.warmup = integer(0);
    else if (key == "--final-lr-fraction")
      o.train.final_lr_fraction = real(0.0, true);
    else if (key == "--weight-decay")
      o.train.adamw.weight_decay = real(0.0, true);
    else if (key == "--clip")
      o.train.clip_norm = real(0.0, true);
    else if (key == "--eval-interval")
      o.train.eval_interval = integer(1);
    else if (key == "--eval-tokens")
      o.train.eval_tokens = integer(1);
    else if (key == "--threads")
      o.threads = integer(0);
    else if (key == "--seed")
      o.seed = static_cast<std::uint64_t>(integer(0));
    else if (key == "--distill-weight")
      o.distill_teacher_weight = real(0.0, true);
    else if (key == "--sample-bytes")
      o.sample_bytes = integer(0);
    else if (key == "--precision") {
      o.precision = next();
      if (o.precision != "fp32" && o.precision != "bf16")
        throw std::invalid_argument("option --precision = '" + o.precision +
                                    "': expected fp32 or bf16");
    } else {
      throw std::invalid_argument("unknown option '" + args[i] + "'");
    }
  }
  if (o.model.d_model % o.model.heads != 0)
    throw std::invalid_argument(
        "option --heads = " + std::to_string(o.model.heads) +
        ": expected a divisor of --d-model = " + std::to_string(o.model.d_model));
  if (o.distill_teacher_weight > 1.0)
    throw std::invalid_argument(
        "option --distill-weight = " + std::to_string(o.distill_teacher_weight) +
        ": expected a number in [0, 1]");
  return o;
}

}  // namespace switch_lm
