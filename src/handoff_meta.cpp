// Codecs of the handoff protocol's payloads and per-descriptor metadata. Pure byte work, no
// syscalls: fuzzed by fuzz/handoff_meta_fuzz.cpp. docs/HANDOFF.md is the layout's spec.
#include <algorithm>
#include <cstring>

#include "sockshare/handoff.hpp"
#include "sockshare/systemd.hpp"

#include "byte_order.hpp"

namespace sockshare::handoff {
namespace {

template <class T>
void put(std::vector<std::byte>& out, T value) {
  std::byte field[sizeof(T)];
  bytes::store_le(field, value);
  out.insert(out.end(), field, field + sizeof(T));
}

template <class T>
T get(const std::byte* in) noexcept {
  return bytes::load_le<T>(in);
}

wire::DecodeResult fail(std::string why) { return {false, std::move(why)}; }
wire::DecodeResult ok() { return {true, {}}; }

wire::DecodeResult exact_size(std::span<const std::byte> bytes, std::size_t size,
                              std::string_view what) {
  if (bytes.size() != size) {
    return fail(std::string(what) + " payload of " + std::to_string(bytes.size()) +
                " bytes, expected " + std::to_string(size));
  }
  return ok();
}

// Metadata entry layout, version 1 (little-endian):
//   off 0 u8 version(1)  off 1 u8 flags  off 2 u16 family  off 4 u16 type  off 6 u16 protocol
//   off 8 u64 cookie     off 16 u16 name_len  off 18 u16 endpoint_len  off 20 name, endpoint
constexpr std::uint8_t kMetaVersion = 1;
constexpr std::uint8_t kMetaFlagControl = 0x01;
constexpr std::size_t kMetaFixed = 20;

}  // namespace

std::string_view to_string(Reason reason) noexcept {
  switch (reason) {
    case Reason::busy: return "busy";
    case Reason::identity: return "identity";
    case Reason::version: return "version";
    case Reason::already_handed_over: return "already handed over";
    case Reason::protocol: return "protocol";
    case Reason::rejected: return "rejected";
  }
  return "unknown";
}

std::vector<std::byte> encode_meta(const ListenerMeta& meta) {
  if (!systemd::is_valid_name(meta.name)) {
    throw Error(ErrorKind::invalid_input, 0, "handoff metadata",
                "listener name \"" + meta.name +
                    "\" is not valid (1-255 printable ASCII characters, no ':')");
  }
  if (meta.endpoint.size() > kMaxEndpointLength) {
    throw Error(ErrorKind::invalid_input, 0, "handoff metadata", "endpoint text too long");
  }
  if (meta.family < 0 || meta.family > 0xFFFF || meta.type < 0 || meta.type > 0xFFFF ||
      meta.protocol < 0 || meta.protocol > 0xFFFF) {
    throw Error(ErrorKind::invalid_input, 0, "handoff metadata", "family/type/protocol out of range");
  }
  std::vector<std::byte> out;
  out.reserve(kMetaFixed + meta.name.size() + meta.endpoint.size());
  put<std::uint8_t>(out, kMetaVersion);
  put<std::uint8_t>(out, meta.control ? kMetaFlagControl : 0);
  put<std::uint16_t>(out, static_cast<std::uint16_t>(meta.family));
  put<std::uint16_t>(out, static_cast<std::uint16_t>(meta.type));
  put<std::uint16_t>(out, static_cast<std::uint16_t>(meta.protocol));
  put<std::uint64_t>(out, meta.cookie);
  put<std::uint16_t>(out, static_cast<std::uint16_t>(meta.name.size()));
  put<std::uint16_t>(out, static_cast<std::uint16_t>(meta.endpoint.size()));
  for (char c : meta.name) out.push_back(static_cast<std::byte>(c));
  for (char c : meta.endpoint) out.push_back(static_cast<std::byte>(c));
  return out;
}

wire::DecodeResult decode_meta(std::span<const std::byte> bytes, ListenerMeta& out) {
  if (bytes.size() < kMetaFixed) {
    return fail("listener metadata of " + std::to_string(bytes.size()) +
                " bytes is shorter than its fixed part");
  }
  const std::byte* p = bytes.data();
  if (auto v = get<std::uint8_t>(p); v != kMetaVersion) {
    return fail("listener metadata version " + std::to_string(v) + " (expected 1)");
  }
  const auto flags = get<std::uint8_t>(p + 1);
  if ((flags & ~kMetaFlagControl) != 0) return fail("unknown listener metadata flags");
  const std::size_t name_len = get<std::uint16_t>(p + 16);
  const std::size_t endpoint_len = get<std::uint16_t>(p + 18);
  if (kMetaFixed + name_len + endpoint_len != bytes.size()) {
    return fail("listener metadata lengths (" + std::to_string(name_len) + " + " +
                std::to_string(endpoint_len) + ") do not match its size " +
                std::to_string(bytes.size()));
  }
  if (endpoint_len > kMaxEndpointLength) return fail("listener endpoint text too long");
  std::string name(reinterpret_cast<const char*>(p + kMetaFixed), name_len);
  if (!systemd::is_valid_name(name)) return fail("invalid listener name in metadata");
  out.control = (flags & kMetaFlagControl) != 0;
  out.family = get<std::uint16_t>(p + 2);
  out.type = get<std::uint16_t>(p + 4);
  out.protocol = get<std::uint16_t>(p + 6);
  out.cookie = get<std::uint64_t>(p + 8);
  out.name = std::move(name);
  out.endpoint.assign(reinterpret_cast<const char*>(p + kMetaFixed + name_len), endpoint_len);
  return ok();
}

std::vector<std::byte> encode(const Hello& hello) {
  std::vector<std::byte> out;
  put<std::uint16_t>(out, hello.version);
  put<std::uint16_t>(out, 0);
  return out;
}

wire::DecodeResult decode(std::span<const std::byte> bytes, Hello& out) {
  if (auto r = exact_size(bytes, 4, "hello"); !r.ok) return r;
  if (get<std::uint16_t>(bytes.data() + 2) != 0) return fail("hello: reserved field not zero");
  out.version = get<std::uint16_t>(bytes.data());
  return ok();
}

std::vector<std::byte> encode(const Batch& batch) {
  std::vector<std::byte> out;
  put<std::uint32_t>(out, batch.first_index);
  put<std::uint32_t>(out, batch.total);
  return out;
}

wire::DecodeResult decode(std::span<const std::byte> bytes, Batch& out) {
  if (auto r = exact_size(bytes, 8, "listeners"); !r.ok) return r;
  Batch b;
  b.first_index = get<std::uint32_t>(bytes.data());
  b.total = get<std::uint32_t>(bytes.data() + 4);
  if (b.total > kMaxListeners + 1) return fail("listeners: more than the limit in one set");
  // An empty set still travels as one message with no descriptors: index 0 of 0.
  if (b.total == 0 ? b.first_index != 0 : b.first_index >= b.total) {
    return fail("listeners: first index beyond the set");
  }
  out = b;
  return ok();
}

std::vector<std::byte> encode(const Ack& ack) {
  std::vector<std::byte> out;
  put<std::uint32_t>(out, ack.count);
  put<std::uint32_t>(out, 0);
  return out;
}

wire::DecodeResult decode(std::span<const std::byte> bytes, Ack& out) {
  if (auto r = exact_size(bytes, 8, "ack"); !r.ok) return r;
  if (get<std::uint32_t>(bytes.data() + 4) != 0) return fail("ack: reserved field not zero");
  out.count = get<std::uint32_t>(bytes.data());
  return ok();
}

std::vector<std::byte> encode(const Refusal& refusal) {
  std::vector<std::byte> out;
  put<std::uint16_t>(out, static_cast<std::uint16_t>(refusal.reason));
  const std::size_t n = std::min(refusal.text.size(), kMaxReasonLength);
  for (std::size_t i = 0; i < n; ++i) out.push_back(static_cast<std::byte>(refusal.text[i]));
  return out;
}

wire::DecodeResult decode(std::span<const std::byte> bytes, Refusal& out) {
  if (bytes.size() < 2) return fail("refusal payload shorter than its reason code");
  if (bytes.size() > 2 + kMaxReasonLength) return fail("refusal text too long");
  const auto code = get<std::uint16_t>(bytes.data());
  if (code < static_cast<std::uint16_t>(Reason::busy) ||
      code > static_cast<std::uint16_t>(Reason::rejected)) {
    return fail("unknown refusal reason " + std::to_string(code));
  }
  out.reason = static_cast<Reason>(code);
  out.text.assign(reinterpret_cast<const char*>(bytes.data() + 2), bytes.size() - 2);
  return ok();
}

}  // namespace sockshare::handoff
