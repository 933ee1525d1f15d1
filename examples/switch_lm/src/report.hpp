#pragma once
// End-of-run outputs: comparison table, CSV of the curves, gnuplot PNG.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "trainer.hpp"

namespace switch_lm {

struct RunSummary {
  std::string name;
  std::size_t parameters = 0;
  std::size_t active_parameters = 0;
  double flops_per_token = 0.0;  // forward
  double final_valid_bits = 0.0;
  double tokens_per_second = 0.0;
  double train_seconds = 0.0;
  int steps = 0;
  std::vector<EvalPoint> curve;
  // Over the whole training run (Switch runs; 0 for dense): paper.sh's columns.
  double dropped_fraction = 0.0;
  double router_entropy = 0.0;  // nats, mean over tokens and Switch layer calls
  int loss_spikes = 0;          // training steps > 0.3 bits/byte above the running mean
  double max_train_bits = 0.0;  // after warm-up
  bool finite = true;           // every training loss was finite
};

struct Crossing {
  double step = 0.0;
  double seconds = 0.0;
};

// First time the validation curve reaches `target` bits/byte, interpolated linearly between the
// evaluation points around the crossing. Empty if never reached.
inline std::optional<Crossing> first_reaching(const std::vector<EvalPoint>& curve, double target) {
  for (std::size_t i = 0; i < curve.size(); ++i) {
    if (curve[i].valid_bits > target) continue;
    if (i == 0) return Crossing{static_cast<double>(curve[0].step), curve[0].seconds};
    const EvalPoint& a = curve[i - 1];
    const EvalPoint& b = curve[i];
    const double f = (a.valid_bits - target) / (a.valid_bits - b.valid_bits);
    return Crossing{a.step + f * (b.step - a.step), a.seconds + f * (b.seconds - a.seconds)};
  }
  return std::nullopt;
}

// Validation loss of a curve at a given training time (linear interpolation; the last value past
// the end of the curve).
inline double valid_bits_at_seconds(const std::vector<EvalPoint>& curve, double seconds) {
  for (std::size_t i = 1; i < curve.size(); ++i) {
    if (curve[i].seconds < seconds) continue;
    const EvalPoint& a = curve[i - 1];
    const EvalPoint& b = curve[i];
    const double f = b.seconds > a.seconds ? (seconds - a.seconds) / (b.seconds - a.seconds) : 1.0;
    return a.valid_bits + f * (b.valid_bits - a.valid_bits);
  }
  return curve.back().valid_bits;
}

inline std::string format_count(double n) {
  char buf[32];
  if (n >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2fG", n / 1e9);
  else if (n >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", n / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

// The comparison table; runs[0] is the dense baseline whose final loss is the target.
inline std::string comparison_table(const std::vector<RunSummary>& runs) {
  const double target = runs.front().final_valid_bits;
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-10s %9s %9s %10s %11s %17s %17s %9s\n", "run", "params",
                "active", "fwd FLOP/t", "valid bpb", "steps to dense", "seconds to dense", "tok/s");
  out += line;
  for (const auto& r : runs) {
    const auto hit = first_reaching(r.curve, target);
    char steps[48], secs[48];
    if (hit) {
      std::snprintf(steps, sizeof steps, "%.0f (%.0f%%)", hit->step,
                    100.0 * hit->step / runs.front().steps);
      std::snprintf(secs, sizeof secs, "%.1f (%.0f%%)", hit->seconds,
                    100.0 * hit->seconds / runs.front().train_seconds);
    } else {
      std::snprintf(steps, sizeof steps, "not reached");
      std::snprintf(secs, sizeof secs, "not reached");
    }
    std::snprintf(line, sizeof line, "%-10s %9s %9s %10s %11.4f %17s %17s %9.0f\n", r.name.c_str(),
                  format_count(static_cast<double>(r.parameters)).c_str(),
                  format_count(static_cast<double>(r.active_parameters)).c_str(),
                  format_count(r.flops_per_token).c_str(), r.final_valid_bits, steps, secs,
                  r.tokens_per_second);
    out += line;
  }
  return out;
}

inline void write_curves_csv(const std::string& path, const std::vector<RunSummary>& runs) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  out << "run,step,tokens,train_seconds,train_bits_per_byte,valid_bits_per_byte\n";
  char line[256];
  for (const auto& r : runs) {
    for (const auto& p : r.curve) {
      std::snprintf(line, sizeof line, "%s,%d,%.0f,%.3f,%.5f,%.5f\n", r.name.c_str(), p.step,
                    p.tokens, p.seconds, p.train_bits, p.valid_bits);
      out << line;
    }
  }
}

// summary.json: one machine-readable record per run (paper.sh's report reads it back).
inline nlohmann::json summary_json(const RunSummary& r) {
  nlohmann::json curve = nlohmann::json::array();
  for (const auto& p : r.curve)
    curve.push_back({{"step", p.step},
                     {"tokens", p.tokens},
                     {"seconds", p.seconds},
                     {"train_bits", p.train_bits},
                     {"valid_bits", p.valid_bits}});
  return {{"name", r.name},
          {"parameters", r.parameters},
          {"active_parameters", r.active_parameters},
          {"flops_per_token", r.flops_per_token},
          {"final_valid_bits", r.final_valid_bits},
          {"initial_valid_bits", r.curve.empty() ? 0.0 : r.curve.front().valid_bits},
          {"tokens_per_second", r.tokens_per_second},
          {"train_seconds", r.train_seconds},
          {"steps", r.steps},
          {"dropped_fraction", r.dropped_fraction},
          {"router_entropy", r.router_entropy},
          {"loss_spikes", r.loss_spikes},
          {"max_train_bits", r.max_train_bits},
          {"finite", r.finite},
          {"curve", curve}};
}

inline RunSummary summary_from_json(const nlohmann::json& j) {
  RunSummary r;
  r.name = j.at("name").get<std::string>();
  r.parameters = j.at("parameters").get<std::size_t>();
  r.active_parameters = j.at("active_parameters").get<std::size_t>();
  r.flops_per_token = j.at("flops_per_token").get<double>();
  r.final_valid_bits = j.at("final_valid_bits").get<double>();
  r.tokens_per_second = j.at("tokens_per_second").get<double>();
  r.train_seconds = j.at("train_seconds").get<double>();
  r.steps = j.at("steps").get<int>();
  r.dropped_fraction = j.at("dropped_fraction").get<double>();
  r.router_entropy = j.at("router_entropy").get<double>();
  r.loss_spikes = j.at("loss_spikes").get<int>();
  r.max_train_bits = j.at("max_train_bits").get<double>();
  r.finite = j.at("finite").get<bool>();
  for (const auto& p : j.at("curve"))
    r.curve.push_back({p.at("step").get<int>(), p.at("tokens").get<double>(),
                       p.at("seconds").get<double>(), p.at("train_bits").get<double>(),
                       p.at("valid_bits").get<double>()});
  return r;
}

// Writes {"options": ..., "runs": [...], ...extra} to path (atomically: a temporary, renamed).
inline void write_summary(const std::string& path, const nlohmann::json& options,
                          const std::vector<RunSummary>& runs,
                          const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json j = extra;
  j["format"] = "switch_lm summary 1";
  j["options"] = options;
  j["runs"] = nlohmann::json::array();
  for (const auto& r : runs) j["runs"].push_back(summary_json(r));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) throw std::runtime_error("cannot write '" + tmp + "'");
    out << j.dump(1) << "\n";
    if (!out) throw std::runtime_error("cannot write '" + tmp + "'");
  }
  std::filesystem::rename(tmp, path);
}

inline bool gnuplot_available() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

// Writes DIR/curves.gp and runs gnuplot on it to make DIR/curves.png: validation bits/byte vs
// steps and vs training seconds, one line per run. Returns a message for the user.
inline std::string plot_curves(const std::string& dir, const std::string& csv,
                               const std::vector<RunSummary>& runs) {
  if (!gnuplot_available())
    return "gnuplot not found (Debian package gnuplot-nox): skipped the plot; the curves are in " +
           csv;
  const std::string script = dir + "/curves.gp";
  const std::string png = dir + "/curves.png";
  {
    std::ofstream gp(script);
    gp << "set terminal pngcairo size 1400,560 font ',11'\n"
       << "set output '" << png << "'\n"
       << "set datafile separator ','\n"
       << "set grid\nset key top right\nset ylabel 'validation bits/byte'\n"
       << "set multiplot layout 1,2 title 'switch\\_lm: dense vs Switch (same FLOPs per token)'\n";
    const char* axes[2][2] = {{"2", "training step"},
                              {"4", "training seconds (evaluation excluded)"}};
    for (const auto& axis : axes) {
      gp << "set xlabel '" << axis[1] << "'\nplot ";
      for (std::size_t i = 0; i < runs.size(); ++i) {
        gp << (i ? ", " : "") << "'" << csv << "' using ($" << axis[0] << "):(strcol(1) eq '"
           << runs[i].name << "' && $2 > 0 ? $6 : NaN) with linespoints lw 2 pt 7 ps 0.5 title '"
           << runs[i].name << "'";
      }
      gp << "\n";
    }
    gp << "unset multiplot\n";
  }
  const std::string command = "gnuplot '" + script + "' 2>'" + dir + "/gnuplot.log'";
  if (std::system(command.c_str()) != 0)
    return "gnuplot failed (see " + dir + "/gnuplot.log); the curves are in " + csv;
  return "plot: " + png;
}

// Printable version of generated bytes: keeps newlines and tabs, replaces other control bytes.
inline std::string printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text)
    out.push_back((c == '\n' || c == '\t' || (c >= 32 && c < 127)) ? static_cast<char>(c) : '?');
  return out;
}

}  // namespace switch_lm
