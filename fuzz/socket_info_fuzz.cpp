// Feeds arbitrary text to SocketInfo::parse and arbitrary bytes to SocketInfo::from_bytes.
// Whatever either accepts must round-trip exactly: parse(format(x)) == x, and the text or
// bytes accepted are the ones format()/to_bytes() write (one spelling per info), and an
// accepted info offers direct redemption only as the contract says: share mode, a descriptor
// number and a cookie; without the offer the number is -1.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

#include "sockshare/error.hpp"
#include "sockshare/grant.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using sockshare::SocketInfo;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const SocketInfo info = SocketInfo::parse(text);
    const std::string again = info.format();
    if (!(SocketInfo::parse(again) == info)) __builtin_trap();
    // Accepted text differs from the canonical form only by surrounding whitespace.
    if (text.find(again) == std::string_view::npos) __builtin_trap();
  } catch (const sockshare::Error& e) {
    if (e.kind() != sockshare::ErrorKind::invalid_input) __builtin_trap();
  }
  try {
    const auto bytes = std::as_bytes(std::span(data, size));
    const SocketInfo info = SocketInfo::from_bytes(bytes);
    const auto again = info.to_bytes();
    if (std::memcmp(again.data(), data, again.size()) != 0) __builtin_trap();
    if ((info.flags & SocketInfo::kFlagDirect) != 0) {
      if (info.mode != sockshare::ShareMode::share || info.source_fd < 0 || info.cookie == 0) {
        __builtin_trap();
      }
    } else if (info.source_fd != -1) {
      __builtin_trap();
    }
  } catch (const sockshare::Error& e) {
    if (e.kind() != sockshare::ErrorKind::invalid_input) __builtin_trap();
  }
  return 0;
}
