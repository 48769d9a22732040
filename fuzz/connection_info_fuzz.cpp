// Feeds arbitrary bytes to the dispatcher's per-connection metadata decoder, as a worker
// receives them from a channel message.
#include <cstddef>
#include <cstdint>
#include <span>

#include "sockshare/dispatch.hpp"
#include "sockshare/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sockshare::dispatch;
  const auto bytes = std::as_bytes(std::span(data, size));
  ConnectionInfo info;
  try {
    info = decode_connection_info(bytes);
  } catch (const sockshare::Error& e) {
    if (e.kind() != sockshare::ErrorKind::protocol) __builtin_trap();
    return 0;
  }
  // What decodes must encode back to exactly the same bytes: the format has one spelling.
  const auto again = encode_connection_info(info);
  if (again.size() != bytes.size()) __builtin_trap();
  for (std::size_t i = 0; i < again.size(); ++i) {
    if (again[i] != bytes[i]) __builtin_trap();
  }
  return 0;
}
