// The handoff protocol's decoders: per-listener metadata and the fixed payloads. Input: one
// selector byte (which decoder), then the bytes as they would arrive.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "sockshare/handoff.hpp"

namespace {

template <class T>
void round_trip(std::span<const std::byte> bytes) {
  T value;
  auto result = sockshare::handoff::decode(bytes, value);
  if (!result.ok) {
    if (result.error.empty()) __builtin_trap();
    return;
  }
  // An accepted payload re-encodes to exactly its bytes: one encoding per value.
  auto again = sockshare::handoff::encode(value);
  if (again.size() != bytes.size()) __builtin_trap();
  for (std::size_t i = 0; i < again.size(); ++i) {
    if (again[i] != bytes[i]) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sockshare::handoff;
  if (size < 1) return 0;
  auto bytes = std::as_bytes(std::span(data + 1, size - 1));
  switch (data[0] % 5) {
    case 0: {
      ListenerMeta meta;
      auto result = decode_meta(bytes, meta);
      if (!result.ok) {
        if (result.error.empty()) __builtin_trap();
        return 0;
      }
      // Whatever the decoder accepts, the encoder can produce, byte for byte.
      auto again = encode_meta(meta);
      if (again.size() != bytes.size()) __builtin_trap();
      for (std::size_t i = 0; i < again.size(); ++i) {
        if (again[i] != bytes[i]) __builtin_trap();
      }
      return 0;
    }
    case 1: round_trip<Hello>(bytes); return 0;
    case 2: round_trip<Batch>(bytes); return 0;
    case 3: round_trip<Ack>(bytes); return 0;
    default: round_trip<Refusal>(bytes); return 0;
  }
}
