#include "log.hpp"

#include <unistd.h>

#include <chrono>
#include <ctime>

#include "linux/sys.hpp"

namespace sockshare::cli::log {

void write(Level level, std::string_view event, std::string_view fields) {
  using namespace std::chrono;
  const auto now = system_clock::now();
  const std::time_t seconds = system_clock::to_time_t(now);
  const auto millis = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  ::gmtime_r(&seconds, &tm);
  char stamp[32];
  std::size_t n = std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
  std::string_view name = level == Level::debug  ? "debug"
                          : level == Level::info ? "info"
                          : level == Level::warn ? "warn"
                                                 : "error";
  std::string line =
      fmt::format("{}.{:03d}Z {} {}", std::string_view(stamp, n), millis, name, event);
  if (!fields.empty() && fields.front() != ' ') line += ' ';
  line += fields;
  line += '\n';
  const char* p = line.data();
  std::size_t left = line.size();
  while (left > 0) {
    ssize_t w = sys::retry_eintr([&] { return ::write(STDERR_FILENO, p, left); });
    if (w <= 0) return;  // stderr gone: nothing sensible left to report to
    p += w;
    left -= static_cast<std::size_t>(w);
  }
}

std::string value(std::string_view text) {
  bool plain = !text.empty();
  for (char c : text) {
    if (c == ' ' || c == '"' || c == '=' || c == '\n' || c == '\t') plain = false;
  }
  if (plain) return std::string(text);
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') quoted += '\\';
    if (c == '\n') {
      quoted += "\\n";
      continue;
    }
    quoted += c;
  }
  quoted += '"';
  return quoted;
}

}  // namespace sockshare::cli::log
