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

// Message types (Header::type). The upper half of the range belongs to sockshare's own
// protocols so an application's types can never collide with them; the application owns
// 0x0000-0x7FFF on its channels.
inline constexpr std::uint16_t kTypeApplicationFirst = 0x0000;
inline constexpr std::uint16_t kTypeApplicationLast = 0x7FFF;
inline constexpr std::uint16_t kTypeReservedBase = 0x8000;  // 0x8000-0xFFFF: sockshare
inline constexpr std::uint16_t kTypeGrantBase = 0x8100;     // 0x81xx: grants (redeem, answer)
inline constexpr std::uint16_t kTypeDispatchBase = 0x8200;  // 0x82xx: dispatcher <-> worker
inline constexpr std::uint16_t kTypeControlBase = 0x8300;   // 0x83xx: control / handoff
[[nodiscard]] constexpr bool is_reserved_type(std::uint16_t type) noexcept {
  return type >= kTypeReservedBase;
}

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
  std::uint64_t seq = 0;       // sender's sequence number: 1, 2, 3, ... per direction; 0 never
  std::uint32_t payload_len = 0;
};

void encode_header(const Header& header, std::span<std::byte, kHeaderSize> out) noexcept;

// Result of decoding: ok, or why not (for an Error(protocol) message).
struct DecodeResult {
  bool ok = false;
  std::string error;
};

// Validates magic, version, flags, reserved fields, seq != 0 and lengths against
// `message_size`, the total number of bytes received (at most kMaxMessage). Never reads
// past the first kHeaderSize bytes of `bytes`.
DecodeResult decode_header(std::span<const std::byte> bytes, std::size_t message_size,
                           Header& out);

// Metadata section: fd_count little-endian u32 lengths, then the bytes of each in order,
// nothing after. Descriptor i's metadata may be empty. decode_metadata rejects a section
// whose table or entries overrun it and one with trailing bytes.
[[nodiscard]] std::size_t metadata_size(std::span<const std::span<const std::byte>> items);
void encode_metadata(std::span<const std::span<const std::byte>> items,
                     std::vector<std::byte>& out);
DecodeResult decode_metadata(std::span<const std::byte> section, std::size_t fd_count,
                             std::vector<std::vector<std::byte>>& out);

}  // namespace sockshare::wire
