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
  if (!result.ok) {
    if (result.error.empty()) __builtin_trap();  // every refusal says why
    return 0;
  }
  // What the decoder promises about a header it accepts (docs/WIRE.md).
  if (size < kHeaderSize || size > kMaxMessage) __builtin_trap();
  if (header.fd_count > kMaxFds || header.seq == 0) __builtin_trap();
  if (kHeaderSize + std::uint64_t{header.meta_len} + header.payload_len != size) __builtin_trap();
  if (!(header.flags & kFlagFdMeta) && header.meta_len != 0) __builtin_trap();
  if (header.flags & kFlagFdMeta) {
    std::vector<std::vector<std::byte>> meta;
    auto decoded =
        decode_metadata(bytes.subspan(kHeaderSize, header.meta_len), header.fd_count, meta);
    if (decoded.ok && meta.size() != header.fd_count) __builtin_trap();
  }
  // A header that decodes must encode back to the same bytes: one encoding per header.
  std::byte again[kHeaderSize];
  encode_header(header, std::span<std::byte, kHeaderSize>(again, kHeaderSize));
  for (std::size_t i = 0; i < kHeaderSize; ++i) {
    if (again[i] != bytes[i]) __builtin_trap();
  }
  return 0;
}
