// Validation of the socket-activation variables, kept free of syscalls so it can be fuzzed
// (fuzz/handoff_fdnames_fuzz.cpp) and tested without touching the environment.
#include <string>

#include "sockshare/systemd.hpp"

namespace sockshare::systemd {
namespace {

// The kernel's default fs.nr_open: no process can hold more descriptors than this unless an
// administrator raised it, so a larger LISTEN_FDS is a corrupted value, and refusing it keeps
// the per-descriptor checks that follow bounded.
constexpr std::size_t kMaxListenFds = 1u << 20;

// Strict decimal: digits only, no sign, no blanks, no leading zeros except "0" itself, as
// a value a service manager writes. nullopt when it is anything else or exceeds `max`.
std::optional<std::size_t> parse_decimal(std::string_view text, std::size_t max) {
  if (text.empty() || text.size() > 10) return std::nullopt;
  if (text.size() > 1 && text[0] == '0') return std::nullopt;
  std::size_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<std::size_t>(c - '0');
  }
  if (value > max) return std::nullopt;
  return value;
}

// Values go into diagnostics; a hostile or broken environment must not be able to put
// control characters or megabytes into the caller's log.
std::string quoted(std::string_view value) {
  constexpr std::size_t kShown = 64;
  std::string out = "\"";
  for (std::size_t i = 0; i < value.size() && i < kShown; ++i) {
    const char c = value[i];
    if (c >= ' ' && c <= '~' && c != '"' && c != '\\') {
      out += c;
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      const auto byte = static_cast<unsigned char>(c);
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xF];
    }
  }
  if (value.size() > kShown) out += "...";
  return out + "\"";
}

}  // namespace

std::string_view to_string(ListenStatus status) noexcept {
  switch (status) {
    case ListenStatus::not_activated: return "not activated";
    case ListenStatus::activated: return "activated";
    case ListenStatus::pid_mismatch: return "LISTEN_PID mismatch";
    case ListenStatus::invalid: return "invalid";
  }
  return "?";
}

bool is_valid_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  for (char c : name) {
    if (c < ' ' || c > '~' || c == ':') return false;
  }
  return true;
}

std::optional<std::vector<std::string>> parse_fd_names(std::string_view value,
                                                       std::size_t expected,
                                                       std::string& error) {
  std::vector<std::string> names;
  // An empty value is a list of no names (systemd writes "" for LISTEN_FDS=0).
  if (!value.empty()) {
    std::size_t start = 0;
    for (;;) {
      const std::size_t colon = value.find(':', start);
      const std::string_view name =
          value.substr(start, colon == std::string_view::npos ? value.npos : colon - start);
      if (names.size() == expected) {
        error = "LISTEN_FDNAMES has more names than the " + std::to_string(expected) +
                " descriptors of LISTEN_FDS";
        return std::nullopt;
      }
      if (!is_valid_name(name)) {
        error = "LISTEN_FDNAMES entry " + std::to_string(names.size()) + " " + quoted(name) +
                " is not a valid name (1-255 printable ASCII characters, no ':')";
        return std::nullopt;
      }
      names.emplace_back(name);
      if (colon == std::string_view::npos) break;
      start = colon + 1;
    }
  }
  if (names.size() != expected) {
    error = "LISTEN_FDNAMES has " + std::to_string(names.size()) + " names for the " +
            std::to_string(expected) + " descriptors of LISTEN_FDS";
    return std::nullopt;
  }
  return names;
}

ParsedListenEnvironment parse_listen_environment(std::optional<std::string_view> listen_fds,
                                                 std::optional<std::string_view> listen_pid,
                                                 std::optional<std::string_view> listen_fdnames,
                                                 pid_t self) {
  ParsedListenEnvironment out;
  if (!listen_fds) return out;
  auto invalid = [&](std::string why) {
    out.status = ListenStatus::invalid;
    out.diagnostic = std::move(why);
    out.names.clear();
    return out;
  };
  auto count = parse_decimal(*listen_fds, kMaxListenFds);
  if (!count) {
    return invalid("LISTEN_FDS=" + quoted(*listen_fds) + " is not a descriptor count (0-" +
                   std::to_string(kMaxListenFds) + ")");
  }
  out.count = *count;
  if (!listen_pid) {
    // Without LISTEN_PID nobody can tell whom the descriptors were meant for; a forked
    // helper of the real recipient would otherwise take them too.
    return invalid("LISTEN_FDS=" + std::string(*listen_fds) +
                   " is set but LISTEN_PID is not; ignoring descriptors that may belong to "
                   "another process");
  }
  auto pid = parse_decimal(*listen_pid, 0x7FFFFFFF);
  if (!pid || *pid == 0) {
    return invalid("LISTEN_PID=" + quoted(*listen_pid) + " is not a process id");
  }
  if (static_cast<pid_t>(*pid) != self) {
    out.status = ListenStatus::pid_mismatch;
    out.diagnostic = "LISTEN_PID=" + std::string(*listen_pid) +
                     " names another process (this is pid " + std::to_string(self) +
                     "): the LISTEN_FDS=" + std::string(*listen_fds) +
                     " descriptors were passed to that process, not to this one. A wrapper "
                     "that forks without exec'ing (a shell running the command in a "
                     "subshell, a daemonizing fork) usually causes this; ignoring them";
    return out;
  }
  out.addressed_to_us = true;
  if (listen_fdnames) {
    std::string error;
    auto names = parse_fd_names(*listen_fdnames, out.count, error);
    if (!names) return invalid(error);
    out.names = std::move(*names);
  } else {
    out.names.assign(out.count, "unknown");
  }
  out.status = ListenStatus::activated;
  return out;
}

InheritedSocket* ListenFds::find(std::string_view name) noexcept {
  for (auto& socket : sockets) {
    if (socket.name == name) return &socket;
  }
  return nullptr;
}

}  // namespace sockshare::systemd
