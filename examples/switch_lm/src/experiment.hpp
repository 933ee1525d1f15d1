#pragma once
// The demonstration: dense and Switch runs trained in lockstep (one step of each in turn, so that
// load from other processes slows both alike), then the comparison, the curves, samples, and the
// optional distillation.

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "options.hpp"
#include "progress.hpp"
#include "report.hpp"
#include "trainer.hpp"

namespace switch_lm {

inline std::string strprintf(const char* format, ...) __attribute__((format(printf, 1, 2)));
inline std::string strprintf(const char* format, ...) {
  char buf[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  return buf;
}

// `text` with newlines and tabs shown as \n and \t (a prompt in a one-line header).
inline std::string escaped(const std::string& text) {
  std::string out;
  for (const char c : printable(text))
    out += c == '\n' ? "\\n" : c == '\t' ? "\\t" : std::string(1, c);
  return out;
}

template <class Policy>
std::string expert_load_lines(Run<Policy>& run) {
  std::string out;
  for (const auto& [block, load] : run.take_expert_loads()) {
    std::string counts;
    for (int n : load.stats.tokens_per_expert)
      counts += strprintf(" %.0f", static_cast<double>(n) / load.calls);
    out += strprintf("    %s block %d: tokens/expert%s | dropped %.1f%% | mean gate %.2f\n",
                     run.name().c_str(), block, counts.c_str(), 100.0 * load.stats.dropped_fraction,
                     load.stats.router_confidence);
  }
  return out;
}

template <class Policy>
RunSummary summarize(Run<Policy>& run, int steps) {
  RunSummary s;
  s.name = run.name();
  s.parameters = run.parameter_count();
  s.active_parameters = run.active_parameter_count();
  s.flops_per_token = run.forward_flops_per_token();
  s.final_valid_bits = run.curve().back().valid_bits;
  s.tokens_per_second = run.tokens_per_second();
  s.train_seconds = run.train_seconds();
  s.steps = steps;
  s.curve = run.curve();
  const TrainingStats& t = run.training_stats();
  s.dropped_fraction = t.dropped_fraction();
  s.router_entropy = t.router_entropy();
  s.loss_spikes = t.loss_spikes;
  s.max_train_bits = t.max_train_bits;
  s.finite = t.finite;
  return s;
}

// One training step of every run. With `concurrent`, the runs take their step at the same time,
// one per OpenMP thread, and the parallel regions inside them (Eigen's, the library's, the
// attention's) run nested, i.e. single-threaded: the demo's matrices are too small to gain from a
// second thread, but two runs on two cores train the pair in the time of the slower one. Each run
// has its own model, optimizer, sampler and random streams, so the result is that of one thread.
// An exception thrown in a run is rethrown after the region.
template <class Policy>
void step_runs(const std::vector<Run<Policy>*>& runs, int step, Run<Policy>* teacher,
               bool concurrent) {
  if (!concurrent) {
    for (auto* run : runs) run->train_step(step, teacher, run->teacher_weight());
    return;
  }
  const int count = static_cast<int>(runs.size());
  std::vector<std::exception_ptr> errors(runs.size());
#pragma omp parallel for num_threads(count) schedule(static, 1)
  for (int i = 0; i < count; ++i) {
    try {
      runs[i]->train_step(step, teacher, runs[i]->teacher_weight());
    } catch (...) {
      errors[i] = std::current_exception();
    }
  }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Trains `runs` in lockstep over steps [first, last] of the options.train.steps schedule (all of
// it by default), evaluating every eval_interval steps and at the last step.
template <class Policy>
void train_lockstep(std::vector<Run<Policy>*> runs, const Options& options, ProgressLine& progress,
                    Run<Policy>* teacher = nullptr, int first = 1, int last = 0) {
  const int steps = options.train.steps;
  if (last <= 0) last = steps;
  const auto start = std::chrono::steady_clock::now();
  auto evaluate_all = [&](int step) {
    std::string line = strprintf("step %5d  valid bits/byte:", step);
    for (auto* run : runs)
      line += strprintf("  %s %.4f", run->name().c_str(), run->evaluate(step).valid_bits);
    progress.print(line);
    for (auto* run : runs) {
      const std::string loads = expert_load_lines(*run);
      if (!loads.empty()) progress.print(loads.substr(0, loads.size() - 1));
    }
  };
  if (first == 1) evaluate_all(0);  // a resumed run's curve has its earlier points
  // Concurrent steps need a thread per run; not with a teacher (the students would share its
  // forward caches) nor across MPI ranks (collectives from two threads of one rank).
  const bool concurrent = options.threads >= static_cast<int>(runs.size()) && teacher == nullptr &&
                          !options.expert_parallel;
  for (int step = first; step <= last; ++step) {
    step_runs(runs, step, teacher, concurrent);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string line = strprintf("step %d/%d", step, steps);
    for (auto* run : runs)
      line += strprintf(" | %s %.0f tok/s loss %.3f", run->name().c_str(), run->tokens_per_second(),
                        run->last_train_bits());
    line += " | ETA " + format_duration(elapsed / (step - first + 1) * (last - step));
    progress.update(line, step == last);
    if (step % options.train.eval_interval == 0 || step == last) evaluate_all(step);
  }
}

template <class Policy>
int run_experiment(const Options& options, const TextData& data, const Ranks& ranks = Ranks()) {
  namespace fs = std::filesystem;
  // --expert-parallel: every rank trains (collectively); rank 0 alone writes the outputs.
  const bool writer = ranks.rank == 0;
  std::error_code ec;
  if (writer) fs::create_directories(options.out, ec);
  if (ec) {
    std::fprintf(stderr, "error: cannot create output directory '%s': %s\n", options.out.c_str(),
                 ec.message().c_str());
    return 1;
  }
  ProgressLine progress;
  const ModelConfig& mc = options.model;
  // --only dense|switch trains one of the two; the comparison needs both.
  std::optional<Run<Policy>> dense, moe;
  if (options.only != "switch")
    dense.emplace("dense", mc, options.train, std::nullopt, options.seed, data, ranks,
                  options.variant);
  if (options.only != "dense")
    moe.emplace("switch", mc, options.train, options.moe, options.seed, data, ranks,
                options.variant);
  std::vector<Run<Policy>*> runs;
  if (dense) runs.push_back(&*dense);
  if (moe) runs.push_back(&*moe);
  if (ranks.enabled) {
    progress.print(
        strprintf("expert parallel: %d ranks, each with %d of the %d experts of every "
                  "Switch layer and %d of the %d sequences of every batch",
                  ranks.size, options.moe.experts / ranks.size, options.moe.experts,
                  options.train.batch / ranks.size, options.train.batch));
  }
  const auto& m = options.moe;
  const Variant& v = options.variant;
  progress.print(strprintf(
      "model: d_model %d, layers %d, heads %d, d_ff %d, context %d, precision %s; Switch: %d "
      "experts "
      "in blocks 1,3,..., capacity factor %.2f (eval %.2f), aux coef %.3g",
      mc.d_model, mc.layers, mc.heads, mc.d_ff, mc.context, options.precision.c_str(), m.experts,
      m.capacity_factor, m.eval_capacity_factor, static_cast<double>(m.aux_loss_coef)));
  progress.print(
      strprintf("variant: top-%d%s, init scale %.2g, dropout %.2g, expert dropout %.2g%s", v.top_k,
                v.dropless ? ", dropless" : "", static_cast<double>(v.init_scale),
                static_cast<double>(v.dropout), static_cast<double>(v.expert_dropout_or_default()),
                options.only.empty() ? "" : (", only the " + options.only + " model").c_str()));
  progress.print(strprintf(
      "training: %d steps of %d x %d tokens, lr %.3g (warm-up %d, cosine to %.2gx), "
      "seed %llu",
      options.train.steps, options.train.batch, mc.context, options.train.lr, options.train.warmup,
      options.train.final_lr_fraction, static_cast<unsigned long long>(options.seed)));
  {
    std::string line = "parameters:";
    for (auto* run : runs)
      line += strprintf(" %s %s (%s active per token, forward FLOPs/token %s)", run->name().c_str(),
                        format_count(static_cast<double>(run->parameter_count())).c_str(),
                        format_count(static_cast<double>(run->active_parameter_count())).c_str(),
                        format_count(run->forward_flops_per_token()).c_str());
    progress.print(line);
  }

  // --load DIR (no --generate): fine-tuning starts from the saved weights (only the weights: the
  // optimizer, schedule and data position are the new run's).
  if (!options.load.empty()) {
    const nlohmann::json state = read_state(options.load);
    const int step = with_state_errors(options.load, [&] { return state.at("step").get<int>(); });
    for (auto* run : runs) load_model(run->model(), model_file(options.load, run->name()), step);
    progress.print(strprintf("fine-tuning the models of %s (after step %d) on %s",
                             options.load.c_str(), step, data.source.c_str()));
  }

  // --resume: the runs continue from the saved step, their state as it was then.
  int first = 1;
  if (!options.resume.empty()) {
    const nlohmann::json state = read_state(options.resume);
    const int saved_step = with_state_errors(options.resume, [&] {
      if (state.at("text_checksum").get<std::string>() != text_checksum(data))
        throw std::runtime_error("checkpoint '" + options.resume + "' was trained on other text (" +
                                 state.at("text").get<std::string>() + ") than " + data.source);
      return state.at("step").get<int>();
    });
    for (auto* run : runs) {
      const nlohmann::json& saved = with_state_errors(
          options.resume,
          [&]() -> const nlohmann::json& { return state.at("runs").at(run->name()); });
      run->load(options.resume, saved_step, saved);
    }
    first = saved_step + 1;
    progress.print(strprintf("resumed from %s after step %d", options.resume.c_str(), saved_step));
  }
  const int last =
      options.stop_at > 0 ? std::min(options.stop_at, options.train.steps) : options.train.steps;
  if (first <= last) train_lockstep<Policy>(runs, options, progress, nullptr, first, last);
  const int reached = std::max(first - 1, last);

  if (!options.save.empty()) {
    fs::create_directories(options.save, ec);
    if (ec) {
      std::fprintf(stderr, "error: cannot create checkpoint directory '%s': %s\n",
                   options.save.c_str(), ec.message().c_str());
      return 1;
    }
    nlohmann::json state;
    state["format"] = "switch_lm checkpoint 1";
    state["step"] = reached;
    state["config"] = training_options(options);
    state["text"] = data.source;
    state["text_checksum"] = text_checksum(data);
    for (auto* run : runs) state["runs"][run->name()] = run->save(options.save, reached);
    write_state(options.save, state);  // last: the files it names are complete
    progress.print(strprintf("saved %s after step %d to %s",
                             runs.size() == 2 ? "both runs" : runs[0]->name().c_str(), reached,
                             options.save.c_str()));
  }
  if (reached < options.train.steps) {
    progress.print(strprintf("stopped after step %d of %d; continue with --resume %s", reached,
                             options.train.steps, options.save.c_str()));
    return 0;
  }

  std::vector<RunSummary> summaries;
  for (auto* run : runs) summaries.push_back(summarize(*run, options.train.steps));
  std::string report = "\n" + comparison_table(summaries);
  nlohmann::json extra = nlohmann::json::object();
  if (dense && moe) {
    const double target = summaries[0].final_valid_bits;
    const auto hit = first_reaching(summaries[1].curve, target);
    const double switch_at_dense_time =
        valid_bits_at_seconds(summaries[1].curve, summaries[0].train_seconds);
    nlohmann::json headline = {{"target_bits", target},
                               {"dense_seconds", summaries[0].train_seconds},
                               {"switch_bits_at_dense_seconds", switch_at_dense_time},
                               {"steps", options.train.steps}};
    if (hit) {
      const double step_fraction = hit->step / options.train.steps;
      headline["switch_step_to_target"] = hit->step;
      headline["switch_seconds_to_target"] = hit->seconds;
      report += strprintf(
          "\nSwitch reached the dense run's final validation loss (%.4f bits/byte) at step %.0f = "
          "%.0f%% "
          "of the dense steps (target <= 60%%: %s),\nafter %.1f s of training = %.0f%% of the "
          "dense "
          "run's %.1f s.\n",
          target, hit->step, 100.0 * step_fraction, step_fraction <= 0.6 ? "met" : "NOT met",
          hit->seconds, 100.0 * hit->seconds / summaries[0].train_seconds,
          summaries[0].train_seconds);
    } else {
      report += strprintf(
          "\nSwitch did not reach the dense run's final validation loss (%.4f bits/byte).\n",
          target);
    }
    extra["headline"] = headline;
    report += strprintf(
        "At the dense run's total training time (%.1f s) Switch is at %.4f bits/byte vs dense "
        "%.4f: "
        "%s.\n",
        summaries[0].train_seconds, switch_at_dense_time, target,
        switch_at_dense_time < target ? "Switch ahead at equal wall-clock" : "Switch NOT ahead");
  }

  if (options.distill) {
    progress.print(strprintf(
        "\ndistillation: dense student (non-expert weights from the Switch teacher), "
        "%.2f teacher / %.2f hard labels, %d steps",
        options.distill_teacher_weight, 1.0 - options.distill_teacher_weight, options.train.steps));
    // Two students from the same start (the teacher's non-expert weights), trained in lockstep on
    // the same batches: one with the teacher's soft targets, one with the labels alone. The second
    // separates the effect of distillation from that of the extra training the start gives.
    Run<Policy> student("distilled", mc, options.train, std::nullopt, options.seed, data, Ranks(),
                        options.variant);
    Run<Policy> control("hard-only", mc, options.train, std::nullopt, options.seed, data, Ranks(),
                        options.variant);
    student.set_teacher_weight(options.distill_teacher_weight);
    control.set_teacher_weight(0.0);
    const int copied = student.copy_matching_parameters(*moe);
    control.copy_matching_parameters(*moe);
    progress.print(strprintf("students start from %d tensors of the teacher", copied));
    train_lockstep<Policy>({&student, &control}, options, progress, &*moe);
    summaries.push_back(summarize(student, options.train.steps));
    summaries.push_back(summarize(control, options.train.steps));
    const std::size_t s_dense = 0, s_switch = summaries.size() - 3;
    const double base = dense ? summaries[s_dense].final_valid_bits : 0.0;
    const double gain = base - summaries[s_switch].final_valid_bits;
    const double kept = base - summaries[summaries.size() - 2].final_valid_bits;
    if (dense) {
      extra["distill"] = {{"teacher_weight", options.distill_teacher_weight},
                          {"gain_bits", gain},
                          {"kept_bits", kept},
                          {"kept_fraction", gain > 0 ? kept / gain : 0.0}};
      report += strprintf(
          "Distilled dense student: %.4f bits/byte; it keeps %.0f%% of the Switch model's gain "
          "over "
          "the dense baseline (%.4f of %.4f bits/byte).\nSame start, labels only: %.4f bits/byte "
          "(the part of the student's gain that comes from its longer training, not from the "
          "teacher).\n",
          summaries[summaries.size() - 2].final_valid_bits, gain > 0 ? 100.0 * kept / gain : 0.0,
          kept, gain, summaries.back().final_valid_bits);
    }
  }

  const std::string csv = options.out + "/curves.csv";
  if (writer) {
    write_curves_csv(csv, summaries);
    write_summary(options.out + "/summary.json", training_options(options), summaries, extra);
    report += "curves: " + csv + ", summary: " + options.out + "/summary.json\n" +
              plot_curves(options.out, csv, summaries) + "\n";
  }

  report += "\nsamples (prompt \"" + escaped(options.prompt) + "\", temperature " +
            strprintf("%.2f", options.temperature) + "):\n";
  for (auto* run : runs) {
    report += "--- " + run->name() + " ---\n" +
              printable(run->generate(options.prompt, options.sample_bytes, options.temperature,
                                      options.seed)) +
              "\n";
  }
  progress.print(report);
  if (writer) std::ofstream(options.out + "/report.txt") << report;

  if (options.quick) {
    bool ok = true;
    for (const auto& s : summaries) {
      if (!(s.final_valid_bits < options.quick_max_bits)) {
        std::fprintf(stderr, "quick check FAILED: %s ends at %.4f bits/byte, expected < %.2f\n",
                     s.name.c_str(), s.final_valid_bits, options.quick_max_bits);
        ok = false;
      }
    }
    if (!ok) return 1;
    std::printf("quick check passed: every run ends below %.2f bits/byte\n",
                options.quick_max_bits);
  }
  return 0;
}

// --load DIR --generate: both saved models sample text after the prompt; nothing is trained and
// no training text is read.
template <class Policy>
int generate_from_checkpoint(const Options& options) {
  const nlohmann::json state = read_state(options.load);
  const int step = with_state_errors(options.load, [&] { return state.at("step").get<int>(); });
  std::printf("models of %s after step %d (prompt \"%s\", temperature %.2f):\n",
              options.load.c_str(), step, escaped(options.prompt).c_str(), options.temperature);
  for (const bool is_switch : {false, true}) {
    const std::string name = is_switch ? "switch" : "dense";
    auto model = Run<Policy>::build_model(
        options.model, is_switch ? std::optional<SwitchSettings>(options.moe) : std::nullopt,
        options.seed, Ranks(), options.variant);
    load_model(model, model_file(options.load, name), step);
    std::printf("--- %s ---\n%s\n", name.c_str(),
                printable(generate_text(model, options.prompt, options.sample_bytes,
                                        options.temperature, options.seed))
                    .c_str());
  }
  return 0;
}

}  // namespace switch_lm
