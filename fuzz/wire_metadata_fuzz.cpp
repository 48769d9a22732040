// The per-descriptor metadata decoder on its own. Input: one byte of descriptor count
// (taken modulo 254), then the section as it would follow the header.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "sockshare/wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sockshare::wire;
  if (size < 1) return 0;
  const std::size_t fd_count = data[0] % (kMaxFds + 1);
  auto section = std::as_bytes(std::span(data + 1, size - 1));
  std::vector<std::vector<std::byte>> items;
  auto result = decode_metadata(section, fd_count, items);
  if (!result.ok) {
    if (result.error.empty()) __builtin_trap();
    return 0;
  }
  if (items.size() != fd_count) __builtin_trap();
  // An accepted section re-encodes to exactly its bytes: nothing skipped, nothing extra.
  std::vector<std::span<const std::byte>> views(items.begin(), items.end());
  if (metadata_size(views) != section.size()) __builtin_trap();
  std::vector<std::byte> again;
  encode_metadata(views, again);
  if (again.size() != section.size()) __builtin_trap();
  for (std::size_t i = 0; i < again.size(); ++i) {
    if (again[i] != section[i]) __builtin_trap();
  }
  return 0;
}
