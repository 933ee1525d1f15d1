#pragma once
// End-of-run outputs: comparison table, CSV of the curves, gnuplot PNG.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
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
