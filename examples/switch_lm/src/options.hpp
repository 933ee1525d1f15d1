#pragma once
// Command-line options of switch_lm.

#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "language_model.hpp"
#include "trainer.hpp"

namespace switch_lm {

// The default demonstration's model and schedule (issue 13, experiment 7; every attempt behind
// them is in results/headline_attempts.md). A dense model this small (d_model 32, d_ff 128, 69k
// parameters against 2.5 MB of text) is capacity-limited within the budget, which is where the
// Switch layers' extra parameters at equal FLOPs pay: with d_model 64 the dense run was still
// gaining fast at the end and Switch needed 74% of its steps; here it needs under 60%.
inline ModelConfig default_model() {
  ModelConfig m;
  m.d_model = 32;
  m.d_ff = 128;
  m.heads = 4;
  m.layers = 4;
  m.context = 64;
  return m;
}

inline TrainConfig default_training() {
  TrainConfig t;
  t.steps = 6000;
  return t;
}

struct Options {
  ModelConfig model = default_model();
  TrainConfig train = default_training();
  SwitchSettings moe;
  std::string precision = "fp32";
  // One thread is fastest for the default model (small matrices); 0: OpenMP default; >= 2: the
  // runs step concurrently (experiment.hpp, step_runs).
  int threads = 1;
  std::uint64_t seed = 1;
  std::string out = "switch_lm_out";
  std::string data;  // empty: the fortunes
  bool quick = false;
  double quick_max_bits = 4.5;  // --quick fails unless both runs end below this
  bool distill = false;
  double distill_teacher_weight = 0.25;  // paper section 4.2: 0.25 teacher / 0.75 hard labels
  int sample_bytes = 320;
  // Checkpoints (checkpoint.hpp).
  std::string save;    // --save DIR: write both runs there after training (or at --stop-at)
  std::string resume;  // --resume DIR: continue the runs saved there
  std::string load;    // --load DIR with --generate: sample from the saved models, no training
  bool generate = false;
  int stop_at = 0;  // 0: train all --steps; N: stop after step N (of the --steps schedule)
  std::string prompt = "%\n";
  double temperature = 0.8;
  bool help = false;
  bool expert_parallel = false;  // --expert-parallel: split the experts over the MPI ranks
  // paper.sh (the paper's ablations): what else a run varies, and which runs to train.
  Variant variant;
  std::string only;  // "dense" or "switch": train that run alone; empty: both, compared
};

inline const char* usage() {
  return R"(usage: switch_lm [options]
Trains a byte-level transformer LM twice on the same data, with dense FFNs and with Switch layers
(every other block) of the same FLOPs per token, and compares them.

data and output
  --data FILE              train on FILE (default: the Debian `fortunes` files)
  --data DIR               train on the regular files of DIR in name order, concatenated
                           (e.g. /usr/share/common-licenses; symbolic links skipped)
  --out DIR                write curves.csv, curves.png, report.txt, summary.json there
                           (default switch_lm_out)
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
  --top-k K                experts per token (default 1 = Switch; 2 = the MoE top-2 baseline)
  --dropless               no expert capacity: no token is dropped
  --router-lr-scale X      learning-rate multiplier of the routers
  --expert-weight-decay 0|1  weight decay on the expert matrices
  --group-size N           routing group tokens (default 0: all tokens of a call, i.e. of a
                           batch, or of a rank's share of it with --expert-parallel)
training
  --steps N --batch N --lr X --warmup N --final-lr-fraction X --weight-decay X --clip X
  --eval-interval N        steps between validation evaluations
  --eval-tokens N          validation tokens per evaluation
  --precision fp32|bf16|bf16-router
                           precision policy of the library layers: switchmoe::Fp32, Bf16
                           (bfloat16 experts, float32 router) or Bf16RouterAblation (bfloat16
                           router too: the paper's Table 2 ablation, unstable by design)
  --init-scale X           initialization scale s of every weight (default 0.1; paper Table 3)
  --dropout X              dropout on the hidden activation of the dense FFNs (default 0)
  --expert-dropout X       dropout inside the experts (default: --dropout; paper Table 4)
  --only dense|switch      train that model alone (no comparison); summary.json as always
  --threads N              OpenMP threads (default 1: fastest for the default model's small
                           matrices; 0 = OpenMP default; deterministic for a given count). With
                           N >= 2 the two runs step concurrently, one per thread (same results
                           as 1 thread; faster only with two free cores)
  --seed N
  --expert-parallel        under mpirun: each Switch layer's experts split over the ranks, each
                           rank a slice of every batch, other weights replicated (needs a build
                           with MPI; --batch and --experts divisible by the rank count)
distillation (paper section 4.2)
  --distill                distill the Switch model into a dense student and report the kept gain
  --distill-weight X       weight of the teacher's soft targets (default 0.25)
  --sample-bytes N         bytes of generated text per model
checkpoints (safetensors; see README.md)
  --save DIR               after training, write both models, AdamW state, step and RNG to DIR
  --stop-at N              stop after step N of the --steps schedule (with --save: resume later)
  --resume DIR             continue the runs saved in DIR exactly (options default to the saved
                           ones; a training option that differs from them is an error)
  --load DIR --generate    sample text from the models saved in DIR, without training
  --load DIR               without --generate: fine-tune the models saved in DIR (their shape
                           options are taken from DIR; weights only: a fresh optimizer and
                           schedule) on --data for --steps
  --prompt TEXT --temperature X   what --generate samples after (default "%\n", 0.8)
)";
}

inline void apply_quick_defaults(Options& o) {
  // The default model, trained for a twentieth of the steps.
  o.quick = true;
  o.train.steps = 300;
  o.train.warmup = 30;
  o.train.eval_interval = 50;
  o.train.eval_tokens = 8192;
  o.sample_bytes = 160;
}

// Throws std::invalid_argument naming the option, its value and what was expected. Options not
// given keep their value in `o` (a checkpoint's options when resuming).
inline Options parse_options(int argc, char** argv, Options o = Options()) {
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
    else if (key == "--group-size")
      o.moe.group_size = integer(0);
    else if (key == "--expert-parallel")
      o.expert_parallel = true;
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
    else if (key == "--save")
      o.save = next();
    else if (key == "--resume")
      o.resume = next();
    else if (key == "--load")
      o.load = next();
    else if (key == "--generate")
      o.generate = true;
    else if (key == "--stop-at")
      o.stop_at = integer(1);
    else if (key == "--prompt")
      o.prompt = next();
    else if (key == "--temperature")
      o.temperature = real(0.0, false);
    else if (key == "--precision") {
      o.precision = next();
      if (o.precision != "fp32" && o.precision != "bf16" && o.precision != "bf16-router")
        throw std::invalid_argument("option --precision = '" + o.precision +
                                    "': expected fp32, bf16 or bf16-router");
    } else if (key == "--top-k") {
      o.variant.top_k = integer(1);
    } else if (key == "--dropless") {
      o.variant.dropless = true;
    } else if (key == "--init-scale") {
      o.variant.init_scale = static_cast<float>(real(0.0, false));
    } else if (key == "--dropout" || key == "--expert-dropout") {
      const double p = real(0.0, true);
      if (p >= 1.0)
        throw std::invalid_argument("option " + key + " = " + std::to_string(p) +
                                    ": expected a probability in [0, 1)");
      (key == "--dropout" ? o.variant.dropout : o.variant.expert_dropout) = static_cast<float>(p);
    } else if (key == "--only") {
      o.only = next();
      if (o.only != "dense" && o.only != "switch")
        throw std::invalid_argument("option --only = '" + o.only + "': expected dense or switch");
    } else {
      throw std::invalid_argument("unknown option '" + args[i] + "'");
    }
  }
  if (o.model.d_model % o.model.heads != 0)
    throw std::invalid_argument(
        "option --heads = " + std::to_string(o.model.heads) +
        ": expected a divisor of --d-model = " + std::to_string(o.model.d_model));
  if (!o.resume.empty() && !o.load.empty())
    throw std::invalid_argument(
        "options --resume and --load exclude each other (--resume DIR "
        "trains on; --load DIR fine-tunes, or only samples with --generate)");
  if (o.generate && o.load.empty())
    throw std::invalid_argument("option --generate needs --load DIR");
  if (o.variant.top_k > o.moe.experts)
    throw std::invalid_argument("option --top-k = " + std::to_string(o.variant.top_k) +
                                ": expected at most --experts = " + std::to_string(o.moe.experts));
  if (o.distill && o.only == "dense")
    throw std::invalid_argument("option --distill needs the Switch teacher (not --only dense)");
  if (o.stop_at > 0 && o.save.empty())
    throw std::invalid_argument("option --stop-at = " + std::to_string(o.stop_at) +
                                " needs --save DIR (a stopped run is only useful resumed)");
  if (o.expert_parallel &&
      (o.distill || o.generate || !o.save.empty() || !o.resume.empty() || !o.load.empty()))
    throw std::invalid_argument(
        "option --expert-parallel: not supported with --distill, --generate, --save, --resume or "
        "--load");
  if (o.distill_teacher_weight > 1.0)
    throw std::invalid_argument(
        "option --distill-weight = " + std::to_string(o.distill_teacher_weight) +
        ": expected a number in [0, 1]");
  return o;
}

// The options that shape training, keyed by their option names: a checkpoint keeps them, and a
// resumed run must have the same (checkpoint_options).
inline nlohmann::json training_options(const Options& o) {
  return {{"d-model", o.model.d_model},
          {"layers", o.model.layers},
          {"heads", o.model.heads},
          {"d-ff", o.model.d_ff},
          {"context", o.model.context},
          {"experts", o.moe.experts},
          {"capacity-factor", o.moe.capacity_factor},
          {"eval-capacity-factor", o.moe.eval_capacity_factor},
          {"aux-coef", o.moe.aux_loss_coef},
          {"z-coef", o.moe.z_loss_coef},
          {"jitter", o.moe.jitter_eps},
          {"router-lr-scale", o.moe.router_lr_scale},
          {"expert-weight-decay", o.moe.expert_weight_decay ? 1 : 0},
          {"group-size", o.moe.group_size},
          {"steps", o.train.steps},
          {"batch", o.train.batch},
          {"lr", o.train.lr},
          {"warmup", o.train.warmup},
          {"final-lr-fraction", o.train.final_lr_fraction},
          {"weight-decay", o.train.adamw.weight_decay},
          {"clip", o.train.clip_norm},
          {"seed", o.seed},
          {"precision", o.precision},
          {"data", o.data},
          {"top-k", o.variant.top_k},
          {"dropless", o.variant.dropless ? 1 : 0},
          {"init-scale", o.variant.init_scale},
          {"dropout", o.variant.dropout},
          {"expert-dropout", o.variant.expert_dropout_or_default()},
          {"only", o.only}};
}

// --load DIR without --generate (fine-tuning): the command line's options, with the model's shape
// (which must match the saved weights) taken from the checkpoint's.
inline Options fine_tune_options(Options o, const std::string& dir, const nlohmann::json& saved) {
  try {
    o.model.d_model = saved.at("d-model").get<int>();
    o.model.layers = saved.at("layers").get<int>();
    o.model.heads = saved.at("heads").get<int>();
    o.model.d_ff = saved.at("d-ff").get<int>();
    o.model.context = saved.at("context").get<int>();
    o.moe.experts = saved.at("experts").get<int>();
    o.variant.top_k = saved.value("top-k", 1);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("checkpoint '" + dir + "': state.json has malformed options (" +
                                e.what() + ")");
  }
  return o;
}

// The command line parsed over the options saved in a checkpoint (`saved`, from state.json of
// `dir`): unspecified options take the saved values; a training option given with another value
// than the saved one is an error, since the run would not continue the saved one.
inline Options checkpoint_options(int argc, char** argv, const std::string& dir,
                                  const nlohmann::json& saved) {
  Options base;
  try {
    base.model.d_model = saved.at("d-model").get<int>();
    base.model.layers = saved.at("layers").get<int>();
    base.model.heads = saved.at("heads").get<int>();
    base.model.d_ff = saved.at("d-ff").get<int>();
    base.model.context = saved.at("context").get<int>();
    base.moe.experts = saved.at("experts").get<int>();
    base.moe.capacity_factor = saved.at("capacity-factor").get<double>();
    base.moe.eval_capacity_factor = saved.at("eval-capacity-factor").get<double>();
    base.moe.aux_loss_coef = saved.at("aux-coef").get<float>();
    base.moe.z_loss_coef = saved.at("z-coef").get<float>();
    base.moe.jitter_eps = saved.at("jitter").get<float>();
    base.moe.router_lr_scale = saved.at("router-lr-scale").get<double>();
    base.moe.expert_weight_decay = saved.at("expert-weight-decay").get<int>() != 0;
    base.moe.group_size = saved.value("group-size", 0);  // absent from older checkpoints
    base.train.steps = saved.at("steps").get<int>();
    base.train.batch = saved.at("batch").get<int>();
    base.train.lr = saved.at("lr").get<double>();
    base.train.warmup = saved.at("warmup").get<int>();
    base.train.final_lr_fraction = saved.at("final-lr-fraction").get<double>();
    base.train.adamw.weight_decay = saved.at("weight-decay").get<double>();
    base.train.clip_norm = saved.at("clip").get<double>();
    base.seed = saved.at("seed").get<std::uint64_t>();
    base.precision = saved.at("precision").get<std::string>();
    base.data = saved.at("data").get<std::string>();
    // Absent from older checkpoints: the defaults.
    base.variant.top_k = saved.value("top-k", 1);
    base.variant.dropless = saved.value("dropless", 0) != 0;
    base.variant.init_scale = saved.value("init-scale", Variant().init_scale);
    base.variant.dropout = saved.value("dropout", 0.0f);
    base.variant.expert_dropout = saved.value("expert-dropout", base.variant.dropout);
    base.only = saved.value("only", std::string());
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("checkpoint '" + dir + "': state.json has malformed options (" +
                                e.what() + ")");
  }
  // --quick's defaults apply over the saved options, so compare after them too.
  Options o = parse_options(argc, argv, base);
  const nlohmann::json now = training_options(o);
  for (const auto& item : saved.items()) {
    if (now.contains(item.key()) && now[item.key()] != item.value())
      throw std::invalid_argument("option --" + item.key() + " = " + now[item.key()].dump() +
                                  " differs from the checkpoint '" + dir + "' (" +
                                  item.value().dump() +
                                  "): a resumed or loaded run keeps the saved options");
  }
  return o;
}

}  // namespace switch_lm
