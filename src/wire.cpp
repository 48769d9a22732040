#include "sockshare/wire.hpp"

#include "byte_order.hpp"

#include <cstddef>
#include <cstring>

namespace sockshare::wire {
namespace {

template <class T>
void put(std::byte* out, T value) noexcept {
  bytes::store_le(out, value);
}

template <class T>
T get(const std::byte* in) noexcept {
  return bytes::load_le<T>(in);
}

DecodeResult fail(std::string why) { return {false, std::move(why)}; }

// The layout docs/WIRE.md describes, as a struct: natural alignment gives exactly the
// documented offsets with no padding, which these asserts pin down.
struct WireLayout {
  std::uint32_t magic;
  std::uint8_t version;
  std::uint8_t flags;
  std::uint8_t fd_count;
  std::uint8_t reserved0;
  std::uint16_t type;
  std::uint16_t reserved1;
  std::uint32_t meta_len;
  std::uint64_t seq;
  std::uint32_t payload_len;
  std::uint32_t reserved2;
};
static_assert(sizeof(WireLayout) == kHeaderSize);
static_assert(offsetof(WireLayout, type) == 8);
static_assert(offsetof(WireLayout, meta_len) == 12);
static_assert(offsetof(WireLayout, seq) == 16);
static_assert(offsetof(WireLayout, payload_len) == 24);

}  // namespace

void encode_header(const Header& h, std::span<std::byte, kHeaderSize> out) noexcept {
  std::byte* p = out.data();
  put<std::uint32_t>(p + 0, kMagic);
  put<std::uint8_t>(p + 4, kVersion);
  put<std::uint8_t>(p + 5, h.flags);
  put<std::uint8_t>(p + 6, h.fd_count);
  put<std::uint8_t>(p + 7, 0);
  put<std::uint16_t>(p + 8, h.type);
  put<std::uint16_t>(p + 10, 0);
  put<std::uint32_t>(p + 12, h.meta_len);
  put<std::uint64_t>(p + 16, h.seq);
  put<std::uint32_t>(p + 24, h.payload_len);
  put<std::uint32_t>(p + 28, 0);
}

DecodeResult decode_header(std::span<const std::byte> bytes, std::size_t message_size,
                           Header& out) {
  if (bytes.size() < kHeaderSize || message_size < kHeaderSize) {
    return fail("message of " + std::to_string(message_size) + " bytes is shorter than the " +
                std::to_string(kHeaderSize) + "-byte header");
  }
  if (message_size > kMaxMessage) {
    return fail("message of " + std::to_string(message_size) + " bytes exceeds the " +
                std::to_string(kMaxMessage) + "-byte limit");
  }
  const std::byte* p = bytes.data();
  if (get<std::uint32_t>(p) != kMagic) return fail("bad magic");
  if (auto v = get<std::uint8_t>(p + 4); v != kVersion) {
    return fail("unsupported version " + std::to_string(v) + " (this side speaks " +
                std::to_string(kVersion) + ")");
  }
  Header h;
  h.flags = get<std::uint8_t>(p + 5);
  h.fd_count = get<std::uint8_t>(p + 6);
  h.type = get<std::uint16_t>(p + 8);
  h.meta_len = get<std::uint32_t>(p + 12);
  h.seq = get<std::uint64_t>(p + 16);
  h.payload_len = get<std::uint32_t>(p + 24);
  if ((h.flags & ~kKnownFlags) != 0) return fail("unknown flags " + std::to_string(h.flags));
  if (get<std::uint8_t>(p + 7) != 0 || get<std::uint16_t>(p + 10) != 0 ||
      get<std::uint32_t>(p + 28) != 0) {
    return fail("non-zero reserved field");
  }
  if (h.fd_count > kMaxFds) return fail("fd_count " + std::to_string(h.fd_count) + " > 253");
  // Numbering starts at 1 so that 0 can mean "unknown" in errors and acknowledgements.
  if (h.seq == 0) return fail("sequence number 0");
  const bool has_meta = (h.flags & kFlagFdMeta) != 0;
  if (!has_meta && h.meta_len != 0) return fail("metadata length without the metadata flag");
  // A sender only sets the flag when it attaches descriptors; anything else is a broken or
  // hostile encoder, and accepting it would give one message two encodings.
  if (has_meta && h.fd_count == 0) return fail("metadata flag on a message without descriptors");
  if (has_meta && h.meta_len < 4u * h.fd_count) return fail("metadata section too short");
  const std::uint64_t expected =
      std::uint64_t{kHeaderSize} + h.meta_len + std::uint64_t{h.payload_len};
  if (expected != message_size) {
    return fail("lengths announce " + std::to_string(expected) + " bytes but the message has " +
                std::to_string(message_size));
  }
  out = h;
  return {true, {}};
}

std::size_t metadata_size(std::span<const std::span<const std::byte>> items) {
  std::size_t total = 4 * items.size();
  for (auto item : items) total += item.size();
  return total;
}

void encode_metadata(std::span<const std::span<const std::byte>> items,
                     std::vector<std::byte>& out) {
  out.resize(metadata_size(items));
  std::byte* p = out.data();
  for (auto item : items) {
    put<std::uint32_t>(p, static_cast<std::uint32_t>(item.size()));
    p += 4;
  }
  for (auto item : items) {
    if (!item.empty()) std::memcpy(p, item.data(), item.size());
    p += item.size();
  }
}

DecodeResult decode_metadata(std::span<const std::byte> section, std::size_t fd_count,
                             std::vector<std::vector<std::byte>>& out) {
  if (section.size() < 4 * fd_count) return fail("metadata section too short for its table");
  std::size_t offset = 4 * fd_count;
  out.resize(fd_count);
  for (std::size_t i = 0; i < fd_count; ++i) {
    const std::size_t len = get<std::uint32_t>(section.data() + 4 * i);
    if (len > section.size() - offset) return fail("metadata entry overruns its section");
    out[i].assign(section.data() + offset, section.data() + offset + len);
    offset += len;
  }
  if (offset != section.size()) return fail("trailing bytes after descriptor metadata");
  return {true, {}};
}

}  // namespace sockshare::wire
