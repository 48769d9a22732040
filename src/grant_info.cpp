// SocketInfo's binary layout and printable form. Platform-neutral: the Windows backend
// carries the same envelope, with a named pipe as its endpoint.
#ifndef _WIN32
#include <sys/socket.h>
#endif
#include <time.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "sockshare/error.hpp"
#include "sockshare/grant.hpp"

#include "byte_order.hpp"

namespace sockshare {
namespace {

constexpr std::uint32_t kMagic = 0x49474B53;  // "SKGI" in little-endian byte order
constexpr std::string_view kPrefix = "sockshare";
constexpr std::size_t kCrcOffset = SocketInfo::kBinarySize - 4;
static_assert(SocketInfo::kTextSize == 11 + (SocketInfo::kBinarySize * 4 + 2) / 3);

[[noreturn]] void bad(std::string_view operation, std::string_view why) {
  throw Error(ErrorKind::invalid_input, 0, std::string(operation), why);
}

// CRC-32 (IEEE 802.3, reflected): catches a character mistyped or lost in copy and paste.
// It is no defence against forgery; the token and the identity checks are.
constexpr std::array<std::uint32_t, 256> make_crc_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr auto kCrcTable = make_crc_table();

std::uint32_t crc32(std::span<const std::byte> bytes) {
  std::uint32_t c = 0xFFFFFFFFU;
  for (std::byte b : bytes) c = kCrcTable[(c ^ static_cast<std::uint8_t>(b)) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

class Writer {
 public:
  explicit Writer(std::span<std::byte> out) : out_(out) {}
  void u8(std::uint8_t v) { out_[pos_++] = std::byte{v}; }
  void u16(std::uint16_t v) { put(v); }
  void u32(std::uint32_t v) { put(v); }
  void u64(std::uint64_t v) { put(v); }
  void raw(const void* data, std::size_t n) {
    std::memcpy(out_.data() + pos_, data, n);
    pos_ += n;
  }

 private:
  template <class T>
  void put(T v) {
    bytes::store_le(out_.data() + pos_, v);
    pos_ += sizeof(T);
  }
  std::span<std::byte> out_;
  std::size_t pos_ = 0;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(in_[pos_++]); }
  std::uint16_t u16() { return get<std::uint16_t>(); }
  std::uint32_t u32() { return get<std::uint32_t>(); }
  std::uint64_t u64() { return get<std::uint64_t>(); }
  void raw(void* data, std::size_t n) {
    std::memcpy(data, in_.data() + pos_, n);
    pos_ += n;
  }

 private:
  template <class T>
  T get() {
    const T v = bytes::load_le<T>(in_.data() + pos_);
    pos_ += sizeof(T);
    return v;
  }
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
};

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

std::string base64url(std::span<const std::byte> in) {
  std::string out;
  out.reserve((in.size() * 4 + 2) / 3);
  std::size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const std::uint32_t v = (std::to_integer<std::uint32_t>(in[i]) << 16) |
                            (std::to_integer<std::uint32_t>(in[i + 1]) << 8) |
                            std::to_integer<std::uint32_t>(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += kAlphabet[(v >> s) & 63];
  }
  const std::size_t rest = in.size() - i;
  if (rest == 1) {
    const std::uint32_t v = std::to_integer<std::uint32_t>(in[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
  } else if (rest == 2) {
    const std::uint32_t v = (std::to_integer<std::uint32_t>(in[i]) << 16) |
                            (std::to_integer<std::uint32_t>(in[i + 1]) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
  }
  return out;
}

// Strict decoding: exact length, no padding, and the unused low bits of the last character
// must be zero, so every accepted text is the one format() would write (no two spellings).
void unbase64url(std::string_view in, std::span<std::byte> out, std::string_view op) {
  if (in.size() != (out.size() * 4 + 2) / 3) {
    bad(op, "expected " + std::to_string((out.size() * 4 + 2) / 3) +
                " base64url characters after the prefix, got " + std::to_string(in.size()) +
                (in.size() < (out.size() * 4 + 2) / 3 ? " (truncated?)" : ""));
  }
  std::uint32_t acc = 0;
  int bits = 0;
  std::size_t o = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const int v = base64_value(in[i]);
    if (v < 0) {
      bad(op, "character " + std::to_string(i) + " is not base64url (A-Z a-z 0-9 - _)");
    }
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = std::byte{static_cast<std::uint8_t>(acc >> bits)};
      acc &= (1U << bits) - 1;
    }
  }
  if (acc != 0) bad(op, "non-canonical final character (stray low bits)");
}

}  // namespace

std::string SocketInfo::endpoint_text() const {
  const auto end = std::find(endpoint.begin(), endpoint.end(), '\0');
  return std::string(endpoint.begin(), end);
}

Endpoint SocketInfo::grant_endpoint() const {
  const std::string text = endpoint_text();
  Endpoint ep;
  if (!text.empty() && text[0] == '@') {
    ep.kind = Endpoint::Kind::unix_abstract;
    ep.path = text.substr(1);
  } else {
    ep.kind = Endpoint::Kind::unix_path;
    ep.path = text;
  }
  return ep;
}

std::string SocketInfo::describe() const {
  SocketIdentity id;
  id.is_socket = true;
  id.family = family;
  id.type = type;
  id.protocol = protocol;
  std::string text = id.describe() + " from pid " + std::to_string(source_pid) + " for pid " +
                     std::to_string(target_pid) +
                     (mode == ShareMode::move      ? " (move"
                      : (flags & kFlagDirect) != 0 ? " (share, direct"
                                                   : " (share");
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const auto now_ns = static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000U +
                      static_cast<std::uint64_t>(now.tv_nsec);
  if (expires_ns <= now_ns) {
    text += ", expired)";
  } else {
    text += ", expires in " + std::to_string((expires_ns - now_ns) / 1'000'000U) + " ms)";
  }
  return text;
}

std::array<std::byte, SocketInfo::kBinarySize> SocketInfo::to_bytes() const {
  std::array<std::byte, kBinarySize> out{};
  Writer w(out);
  w.u32(kMagic);
  w.u16(version);
  w.u8(static_cast<std::uint8_t>(mode));
  w.u8(flags);
  w.u32(static_cast<std::uint32_t>(family));
  w.u32(static_cast<std::uint32_t>(type));
  w.u32(static_cast<std::uint32_t>(protocol));
  w.u64(cookie);
  w.u32(static_cast<std::uint32_t>(source_fd));
  w.u32(static_cast<std::uint32_t>(source_pid));
  w.u32(source_uid);
  w.u64(source_inode);
  w.u32(static_cast<std::uint32_t>(target_pid));
  w.u32(target_uid);
  w.u64(target_inode);
  w.u64(expires_ns);
  w.raw(token.data(), token.size());
  w.raw(endpoint.data(), endpoint.size());
  w.u32(crc32(std::span<const std::byte>(out).first(kCrcOffset)));
  return out;
}

SocketInfo SocketInfo::from_bytes(std::span<const std::byte> bytes) {
  constexpr std::string_view op = "SocketInfo::from_bytes";
  if (bytes.size() != kBinarySize) {
    bad(op,
        "expected " + std::to_string(kBinarySize) + " bytes, got " + std::to_string(bytes.size()));
  }
  Reader r(bytes);
  if (r.u32() != kMagic) bad(op, "not a sockshare socket info (bad magic)");
  SocketInfo info;
  info.version = r.u16();
  if (info.version != kVersion) {
    bad(op, "version " + std::to_string(info.version) + " is not supported (this build reads " +
                std::to_string(kVersion) + ")");
  }
  const std::uint8_t mode = r.u8();
  if (mode > static_cast<std::uint8_t>(ShareMode::move))
    bad(op, "unknown mode " + std::to_string(mode));
  info.mode = static_cast<ShareMode>(mode);
  info.flags = r.u8();
  if ((info.flags & ~kKnownFlags) != 0) bad(op, "unknown flags set");
  info.family = static_cast<std::int32_t>(r.u32());
  info.type = static_cast<std::int32_t>(r.u32());
  info.protocol = static_cast<std::int32_t>(r.u32());
  info.cookie = r.u64();
  info.source_fd = static_cast<std::int32_t>(r.u32());
  info.source_pid = static_cast<std::int32_t>(r.u32());
  info.source_uid = r.u32();
  info.source_inode = r.u64();
  info.target_pid = static_cast<std::int32_t>(r.u32());
  info.target_uid = r.u32();
  info.target_inode = r.u64();
  info.expires_ns = r.u64();
  r.raw(info.token.data(), info.token.size());
  r.raw(info.endpoint.data(), info.endpoint.size());
  const std::uint32_t crc = r.u32();
  if (crc != crc32(bytes.first(kCrcOffset))) bad(op, "checksum mismatch (damaged or edited)");
  if (info.source_pid <= 0 || info.target_pid <= 0) bad(op, "source or target pid not positive");
  if ((info.flags & kFlagDirect) != 0) {
    // Direct redemption rests on the cookie check (R20) and exists for share grants only.
    if (info.mode != ShareMode::share) bad(op, "direct redemption offered for a move grant");
    if (info.source_fd < 0) bad(op, "direct redemption offered without a descriptor number");
    if (info.cookie == 0) bad(op, "direct redemption offered without a socket cookie");
  } else if (info.source_fd != -1) {
    bad(op, "descriptor number set without the direct flag");
  }
  // The endpoint: '@' or '/', then non-NUL bytes, then only NUL padding (at least one NUL,
  // so the text always fits sun_path with its terminator or leading NUL).
  const auto end = std::find(info.endpoint.begin(), info.endpoint.end(), '\0');
  if (end == info.endpoint.end()) bad(op, "endpoint not terminated");
#ifdef _WIN32
  // The Windows backend serves grants on a local named pipe (docs/WINDOWS.md).
  constexpr std::string_view pipe_prefix = "\\\\.\\pipe\\";
  if (std::string_view(info.endpoint.data(), static_cast<std::size_t>(end - info.endpoint.begin()))
              .substr(0, pipe_prefix.size()) != pipe_prefix ||
      static_cast<std::size_t>(end - info.endpoint.begin()) <= pipe_prefix.size()) {
    bad(op, "endpoint must be a local named pipe \\\\.\\pipe\\name");
  }
#else
  if (end - info.endpoint.begin() < 2 || (info.endpoint[0] != '@' && info.endpoint[0] != '/')) {
    bad(op, "endpoint must be @name or /path");
  }
#endif
  if (std::any_of(end, info.endpoint.end(), [](char c) { return c != '\0'; })) {
    bad(op, "endpoint padding not zero");
  }
  return info;
}

std::string SocketInfo::format() const {
  const auto bytes = to_bytes();
  return std::string(kPrefix) + std::to_string(kVersion) + ":" + base64url(bytes);
}

SocketInfo SocketInfo::parse(std::string_view text) {
  constexpr std::string_view op = "SocketInfo::parse";
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!text.empty() && space(text.front())) text.remove_prefix(1);
  while (!text.empty() && space(text.back())) text.remove_suffix(1);
  if (text.substr(0, kPrefix.size()) != kPrefix) bad(op, "missing \"sockshare1:\" prefix");
  text.remove_prefix(kPrefix.size());
  const std::size_t colon = text.find(':');
  if (colon == std::string_view::npos || colon == 0 || colon > 5) {
    bad(op, "missing version number and ':' after \"sockshare\"");
  }
  const std::string_view version = text.substr(0, colon);
  if (version != std::to_string(kVersion)) {
    bad(op, "version " + std::string(version) + " is not supported (this build reads " +
                std::to_string(kVersion) + ")");
  }
  std::array<std::byte, kBinarySize> bytes{};
  unbase64url(text.substr(colon + 1), bytes, op);
  return from_bytes(bytes);
}

std::string_view to_string(GrantOutcome outcome) noexcept {
  switch (outcome) {
    case GrantOutcome::redeemed:
      return "redeemed";
    case GrantOutcome::refused:
      return "refused";
    case GrantOutcome::expired:
      return "expired";
    case GrantOutcome::revoked:
      return "revoked";
    case GrantOutcome::target_exited:
      return "target exited";
    case GrantOutcome::failed:
      return "failed";
    case GrantOutcome::lapsed:
      return "lapsed";
  }
  return "unknown";
}

}  // namespace sockshare
