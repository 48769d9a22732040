// The channel's wire format: one SEQPACKET message = header, descriptor metadata, payload,
// with the descriptors in a single SCM_RIGHTS control message. docs/WIRE.md is the
// normative description; this header and that document must agree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace sockshare::wire {

inline constexpr std::uint32_t kMagic = 0x48534B53;  // "SKSH" in little-endian byte order
inline constexpr std::uint8_t kVersion = 1;
inline constexpr std::size_t kHeaderSize = 32;
// The kernel's SCM_MAX_FD: 253 descriptors per sendmsg, 254 gives EINVAL (R8).
inline constexpr std::size_t kMaxFds = 253;
// Whole message (header + metadata + payload). Stays below the default SEQPACKET send
// buffer so a message is never refused for size by a default-configured kernel.
inline constexpr std::size_t kMaxMessage = 65536;
inline constexpr std::size_t kMaxPayload = kMaxMessage - kHeaderSize;

// Header flags. Bits not defined here must be zero; a receiver rejects them.
inline constexpr std::uint8_t kFlagFdMeta = 0x01;  // a descriptor metadata section follows
inline constexpr std::uint8_t kKnownFlags = kFlagFdMeta;

// Decoded header. On the wire every field is little-endian, in this order:
//   off 0  u32 magic        off 4  u8 version   off 5 u8 flags   off 6 u8 fd_count
//   off 7  u8  reserved(0)  off 8  u16 type     off 10 u16 reserved(0)
//   off 12 u32 meta_len     off 16 u64 seq      off 24 u32 payload_len  off 28 u32 reserved(0)
struct Header {
  std::uint8_t flags = 0;
  std::uint8_t fd_count = 0;
  std::uint16_t type = 0;      // message type of the protocol layered on the channel
  std::uint32_t meta_len = 0;  // bytes of the metadata section (0 without kFlagFdMeta)
  std::uint64_t seq = 0;       // sender's sequence number, starts at 1, +1 per message
  std::uint32_t payload_len = 0;
};

void encode_header(const Header& header, std::span<std::byte, kHeaderSize> out) noexcept;

// Result of decoding: ok, or why not (for an Error(protocol) message).
struct DecodeResult {
  bool ok = false;
  std::string error;
};

// Validates magic, version, flags, reserved fields and lengths against `message_size`, the
// total number of bytes received. Never reads past `bytes`.
DecodeResult decode_header(std::span<const std::byte> bytes, std::size_t message_size,
                           Header& out);

// Metadata section: fd_count little-endian u32 lengths, then the bytes of each in order.
// Descriptor i's metadata may be empty.
[[nodiscard]] std::size_t metadata_size(std::span<const std::span<const std::byte>> items);
void encode_metadata(std::span<const std::span<const std::byte>> items,
                     std::vector<std::byte>& out);
DecodeResult decode_metadata(std::span<const std::byte> section, std::size_t fd_count,
                             std::vector<std::vector<std::byte>>& out);

}  // namespace sockshare::wire
