// The built-in worker's HTTP/1.1 request parser and response writer. Small on purpose: it
// parses only what it needs to answer correctly (method, target, version, Host,
// Content-Length, Transfer-Encoding, Connection, Expect, X-Burn-Ms), and refuses the rest
// clearly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace sockshare::cli::http {

struct Limits {
  std::size_t max_header_bytes = 8192;  // request line + headers
  std::size_t max_body_bytes = 65536;   // bodies are read and discarded
  std::uint32_t max_burn_ms = 10000;
};

enum class Status {
  complete,         // `request` is valid and `consumed` bytes belong to it
  incomplete,       // need more bytes
  bad_request,      // 400, then close: the stream can no longer be framed
  too_large,        // 431 (headers) or 413 (body), then close
  not_implemented,  // 501 (Transfer-Encoding), then close
  bad_version,      // 505, then close
};

struct Request {
  std::string_view method;
  std::string_view target;
  int minor_version = 1;
  bool keep_alive = true;
  bool head = false;
  bool body_too_large = false;  // with Status::too_large: 413 rather than 431
  // "Expect: 100-continue" in an HTTP/1.1 request (RFC 9110 10.1.1: ignored in 1.0): the
  // client may hold its body back until it sees "100 Continue" or a final status.
  bool expect_continue = false;
  std::uint32_t burn_ms = 0;    // from /burn?ms=N or X-Burn-Ms: N, capped at max_burn_ms
};

struct ParseResult {
  Status status = Status::incomplete;
  std::size_t consumed = 0;
  // With Status::incomplete: the head is complete and valid, the body has not all arrived.
  bool awaiting_body = false;
  Request request;
};

// Parses the first request in `buffer`. Leading empty lines are skipped (RFC 9112 2.2). The
// views in `request` point into `buffer`.
[[nodiscard]] ParseResult parse_request(std::string_view buffer, const Limits& limits = {});

// Caches the Date header line, refreshed at most once a second.
class DateCache {
 public:
  // "Date: Thu, 26 Nov 2026 13:55:26 GMT\r\n"
  [[nodiscard]] std::string_view line();

 private:
  long long second_ = -1;
  char text_[64] = {};
  std::size_t size_ = 0;
};

// Appends a complete response to `out`. The body is omitted for HEAD but Content-Length still
// announces it. `close` adds "Connection: close"; `keep_alive_1_0` adds
// "Connection: keep-alive" for an HTTP/1.0 client that asked for it.
void append_response(std::string& out, int status, std::string_view body, bool head, bool close,
                     bool keep_alive_1_0, std::string_view date_line);

[[nodiscard]] std::string_view reason_phrase(int status) noexcept;

}  // namespace sockshare::cli::http
