// Feeds arbitrary bytes to the built-in worker's HTTP request parser, as a client could send
// them. Besides memory safety it checks the properties the worker relies on when it parses
// its buffer again each time more bytes arrive: TCP may split a request anywhere, so every
// strict prefix of a complete request must read as incomplete, never as an error; and what
// follows a request never changes how that request reads.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "http.hpp"

namespace {

using sockshare::cli::http::Limits;
using sockshare::cli::http::ParseResult;
using sockshare::cli::http::Status;
using sockshare::cli::http::parse_request;

bool inside(std::string_view part, std::string_view whole) {
  return part.empty() || (part.data() >= whole.data() &&
                          part.data() + part.size() <= whole.data() + whole.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Small limits, so the fuzzer reaches them with short inputs.
  const Limits limits{.max_header_bytes = 256, .max_body_bytes = 64, .max_burn_ms = 50};
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const ParseResult r = parse_request(input, limits);

  if (r.awaiting_body && r.status != Status::incomplete) __builtin_trap();
  if (r.status != Status::complete) {
    if (r.consumed != 0) __builtin_trap();
    return 0;
  }
  const auto& req = r.request;
  if (r.consumed == 0 || r.consumed > size) __builtin_trap();
  if (!inside(req.method, input) || !inside(req.target, input)) __builtin_trap();
  if (req.method.empty() || req.target.empty()) __builtin_trap();
  if (req.burn_ms > limits.max_burn_ms) __builtin_trap();
  if (req.minor_version < 0 || req.minor_version > 9) __builtin_trap();
  if (req.head != (req.method == "HEAD")) __builtin_trap();
  if (req.expect_continue && req.minor_version == 0) __builtin_trap();

  // The request alone reads the same as with whatever follows it.
  const std::string_view alone = input.substr(0, r.consumed);
  const ParseResult again = parse_request(alone, limits);
  if (again.status != Status::complete || again.consumed != r.consumed ||
      again.request.keep_alive != req.keep_alive || again.request.burn_ms != req.burn_ms ||
      again.request.expect_continue != req.expect_continue) {
    __builtin_trap();
  }

  // Every way TCP could have delivered it in two parts: the first part is incomplete. Long
  // requests are checked at up to 512 cut points spread over their length.
  const std::size_t step = std::max<std::size_t>(1, r.consumed / 512);
  for (std::size_t cut = 0; cut < r.consumed; cut += step) {
    const ParseResult part = parse_request(alone.substr(0, cut), limits);
    if (part.status != Status::incomplete) __builtin_trap();
  }
  return 0;
}
