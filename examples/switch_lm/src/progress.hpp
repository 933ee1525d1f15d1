#pragma once
// Console output while training: one progress line redrawn in place on a terminal, plain lines at
// most every `plain_interval` seconds otherwise (CI logs), and permanent messages that never get
// mixed with a half-drawn progress line.

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace switch_lm {

class ProgressLine {
 public:
  explicit ProgressLine(std::FILE* out = stdout, double plain_interval_seconds = 10.0)
      : out_(out), tty_(isatty(fileno(out)) != 0), plain_interval_(plain_interval_seconds) {}

  bool is_tty() const { return tty_; }

  // Redraws the progress line (terminal) or prints it if the plain interval has passed; `force`
  // prints it regardless (e.g. the last step).
  void update(const std::string& line, bool force = false) {
    const auto now = std::chrono::steady_clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (tty_) {
      if (!force && drawn_ && since < 0.1) return;
      std::fprintf(out_, "\r\033[K%s", line.c_str());
      drawn_ = true;
    } else {
      if (!force && since < plain_interval_) return;
      std::fprintf(out_, "%s\n", line.c_str());
    }
    std::fflush(out_);
    last_ = now;
  }

  // A permanent line (ends with a newline); clears the progress line first on a terminal.
  void print(const std::string& line) {
    if (tty_ && drawn_) std::fprintf(out_, "\r\033[K");
    drawn_ = false;
    std::fprintf(out_, "%s\n", line.c_str());
    std::fflush(out_);
  }

 private:
  std::FILE* out_;
  bool tty_;
  double plain_interval_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

inline std::string format_duration(double seconds) {
  const int s = static_cast<int>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%dh%02dm%02ds", s / 3600, (s / 60) % 60, s % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ds", s);
  return buf;
}

}  // namespace switch_lm
