// The socket-activation variables as a service manager (or a hostile parent) could set
// them. Input: LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES separated by NUL bytes; a missing
// field is an unset variable. The pid of "this process" is fixed at 4242.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "sockshare/systemd.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sockshare::systemd;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::optional<std::string_view> fields[3];
  for (auto& field : fields) {
    if (input.empty() && &field != &fields[0]) break;
    const auto nul = input.find('\0');
    field = input.substr(0, nul);
    input = nul == std::string_view::npos ? std::string_view{} : input.substr(nul + 1);
    if (nul == std::string_view::npos) break;
  }
  auto parsed = parse_listen_environment(fields[0], fields[1], fields[2], 4242);
  switch (parsed.status) {
    case ListenStatus::not_activated:
      if (fields[0] || !parsed.names.empty()) __builtin_trap();
      break;
    case ListenStatus::activated:
      if (!parsed.addressed_to_us || parsed.names.size() != parsed.count) __builtin_trap();
      for (const auto& name : parsed.names) {
        if (name != "unknown" && !is_valid_name(name)) __builtin_trap();
      }
      break;
    case ListenStatus::pid_mismatch:
    case ListenStatus::invalid:
      if (parsed.diagnostic.empty() || !parsed.names.empty()) __builtin_trap();
      // Diagnostics go to logs: never a raw control character from the input.
      for (char c : parsed.diagnostic) {
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) __builtin_trap();
      }
      break;
  }
  if (fields[2]) {
    std::string error;
    auto names = parse_fd_names(*fields[2], parsed.count, error);
    if (!names && error.empty()) __builtin_trap();
    if (names && names->size() != parsed.count) __builtin_trap();
  }
  return 0;
}
