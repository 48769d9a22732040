// One line per event on stderr: "2026-11-26T13:55:26.123Z info event key=value ...".
// Each line is written with a single write(2) so lines from the supervisor and its workers
// (which share stderr) never interleave mid-line.
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>
#include <utility>

namespace sockshare::cli::log {

enum class Level { debug, info, warn, error };

// Writes "<timestamp> <level> <event><fields>\n". `fields` is pre-formatted " k=v k=v".
void write(Level level, std::string_view event, std::string_view fields);

// Quotes a value when it contains spaces, quotes or '=' so lines stay machine-splittable.
[[nodiscard]] std::string value(std::string_view text);

template <class... Args>
void info(std::string_view event, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::info, event, fmt::format(format, std::forward<Args>(args)...));
}
template <class... Args>
void warn(std::string_view event, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::warn, event, fmt::format(format, std::forward<Args>(args)...));
}
template <class... Args>
void error(std::string_view event, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::error, event, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace sockshare::cli::log
