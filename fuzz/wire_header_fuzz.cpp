// Feeds arbitrary bytes to the channel's decoders as if they had arrived on a socket.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "sockshare/wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sockshare::wire;
  auto bytes = std::as_bytes(std::span(data, size));
  Header header;
  auto result = decode_header(bytes, bytes.size(), header);
  if (!result.ok) return 0;
  if (header.flags & kFlagFdMeta) {
    std::vector<std::vector<std::byte>> meta;
    (void)decode_metadata(bytes.subspan(kHeaderSize, header.meta_len), header.fd_count, meta);
  }
  // A header that decodes must encode back to the same bytes.
  std::byte again[kHeaderSize];
  encode_header(header, std::span<std::byte, kHeaderSize>(again, kHeaderSize));
  for (std::size_t i = 0; i < kHeaderSize; ++i) {
    if (again[i] != bytes[i]) __builtin_trap();
  }
  return 0;
}
