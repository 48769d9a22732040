#include "http.hpp"

#include <charconv>
#include <ctime>

namespace sockshare::cli::http {
namespace {

bool is_tchar(char c) noexcept {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
      return true;
    default:
      return false;
  }
}

bool is_token(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (char c : s) {
    if (!is_tchar(c)) return false;
  }
  return true;
}

char lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c;
}

bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::string_view trim_ows(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Digits only: "+5", "-1", " 5" and overflow are all malformed.
bool parse_decimal(std::string_view s, std::uint64_t& out) noexcept {
  if (s.empty()) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && end == s.data() + s.size();
}

// Takes one line ending in LF (an optional CR before it is dropped). False when no LF yet.
bool next_line(std::string_view buffer, std::size_t& pos, std::string_view& line) noexcept {
  auto lf = buffer.find('\n', pos);
  if (lf == std::string_view::npos) return false;
  std::size_t end = lf;
  if (end > pos && buffer[end - 1] == '\r') --end;
  line = buffer.substr(pos, end - pos);
  pos = lf + 1;
  return true;
}

// A control character or a bare CR inside a line makes the framing ambiguous (request
// smuggling): refuse it.
bool has_forbidden_bytes(std::string_view line) noexcept {
  for (char c : line) {
    auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) return true;
  }
  return false;
}

std::uint32_t burn_from_target(std::string_view target, bool& malformed) noexcept {
  if (!target.starts_with("/burn")) return 0;
  std::string_view rest = target.substr(5);
  if (rest.empty() || rest.front() != '?') return 0;
  rest.remove_prefix(1);
  while (!rest.empty()) {
    auto amp = rest.find('&');
    std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view{} : rest.substr(amp + 1);
    if (pair.starts_with("ms=")) {
      std::uint64_t ms = 0;
      if (!parse_decimal(pair.substr(3), ms)) {
        malformed = true;
        return 0;
      }
      return ms > 0xffffffffULL ? 0xffffffffU : static_cast<std::uint32_t>(ms);
    }
  }
  return 0;
}

}  // namespace

ParseResult parse_request(std::string_view buffer, const Limits& limits) {
  ParseResult result;
  std::size_t pos = 0;
  // Empty lines before a request line are tolerated, but not without bound.
  while (pos < buffer.size() && (buffer[pos] == '\r' || buffer[pos] == '\n')) {
    ++pos;
    if (pos > limits.max_header_bytes) {
      result.status = Status::too_large;
      return result;
    }
  }
  const std::size_t start = pos;
  auto header_too_long = [&] { return buffer.size() - start > limits.max_header_bytes; };

  std::string_view line;
  if (!next_line(buffer, pos, line)) {
    result.status = header_too_long() ? Status::too_large : Status::incomplete;
    return result;
  }
  if (has_forbidden_bytes(line)) {
    result.status = Status::bad_request;
    return result;
  }
  Request& req = result.request;
  {
    auto sp1 = line.find(' ');
    auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos) {
      result.status = Status::bad_request;
      return result;
    }
    req.method = line.substr(0, sp1);
    req.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    std::string_view version = line.substr(sp2 + 1);
    if (!is_token(req.method) || req.target.empty() ||
        req.target.find('\t') != std::string_view::npos || version.size() != 8 ||
        !version.starts_with("HTTP/") || version[6] != '.' || version[5] < '0' ||
        version[5] > '9' || version[7] < '0' || version[7] > '9') {
      result.status = Status::bad_request;
      return result;
    }
    if (version[5] != '1') {
      result.status = Status::bad_version;
      return result;
    }
    req.minor_version = version[7] - '0';
    req.keep_alive = req.minor_version >= 1;
    req.head = req.method == "HEAD";
  }

  bool have_host = false;
  bool have_length = false;
  bool have_transfer_encoding = false;
  bool conn_close = false;
  bool conn_keep_alive = false;
  bool malformed_burn = false;
  std::uint64_t content_length = 0;
  std::uint64_t burn = 0;
  for (;;) {
    if (!next_line(buffer, pos, line)) {
      result.status = header_too_long() ? Status::too_large : Status::incomplete;
      return result;
    }
    if (pos - start > limits.max_header_bytes) {
      result.status = Status::too_large;
      return result;
    }
    if (line.empty()) break;
    if (has_forbidden_bytes(line) || line.front() == ' ' || line.front() == '\t') {
      // Obsolete line folding is refused (RFC 9112 5.2 allows 400).
      result.status = Status::bad_request;
      return result;
    }
    auto colon = line.find(':');
    if (colon == std::string_view::npos || !is_token(line.substr(0, colon))) {
      result.status = Status::bad_request;
      return result;
    }
    std::string_view name = line.substr(0, colon);
    std::string_view value = trim_ows(line.substr(colon + 1));
    if (iequals(name, "host")) {
      if (have_host) {
        result.status = Status::bad_request;
        return result;
      }
      have_host = true;
    } else if (iequals(name, "content-length")) {
      std::uint64_t n = 0;
      if (!parse_decimal(value, n) || (have_length && n != content_length)) {
        result.status = Status::bad_request;
        return result;
      }
      have_length = true;
      content_length = n;
    } else if (iequals(name, "transfer-encoding")) {
      have_transfer_encoding = true;
    } else if (iequals(name, "connection")) {
      while (!value.empty()) {
        auto comma = value.find(',');
        std::string_view option = trim_ows(value.substr(0, comma));
        value = comma == std::string_view::npos ? std::string_view{} : value.substr(comma + 1);
        if (iequals(option, "close")) conn_close = true;
        if (iequals(option, "keep-alive")) conn_keep_alive = true;
      }
    } else if (iequals(name, "expect")) {
      req.expect_continue = req.minor_version >= 1 && iequals(value, "100-continue");
    } else if (iequals(name, "x-burn-ms")) {
      if (!parse_decimal(value, burn)) malformed_burn = true;
    }
  }
  // Judged with the rest of the head, so a client told "100 Continue" is not refused after
  // it has sent its body.
  const std::uint64_t path_burn = burn_from_target(req.target, malformed_burn);
  if (malformed_burn || (req.minor_version >= 1 && !have_host)) {
    // RFC 9112 3.2: a 1.1 request without exactly one Host is answered with 400.
    result.status = Status::bad_request;
    return result;
  }
  if (have_transfer_encoding) {
    // Chunked bodies are not needed by anything this worker serves; refusing them keeps the
    // framing unambiguous (a request with both headers is a smuggling attempt anyway).
    result.status = have_length ? Status::bad_request : Status::not_implemented;
    return result;
  }
  if (content_length > limits.max_body_bytes) {
    req.body_too_large = true;
    result.status = Status::too_large;
    return result;
  }
  if (buffer.size() - pos < content_length) {
    result.status = Status::incomplete;
    result.awaiting_body = true;
    return result;
  }
  pos += static_cast<std::size_t>(content_length);

  if (path_burn > burn) burn = path_burn;
  req.burn_ms = static_cast<std::uint32_t>(burn > limits.max_burn_ms ? limits.max_burn_ms : burn);
  if (req.minor_version >= 1) {
    req.keep_alive = !conn_close;
  } else {
    req.keep_alive = conn_keep_alive && !conn_close;
  }
  result.status = Status::complete;
  result.consumed = pos;
  return result;
}

std::string_view DateCache::line() {
  const std::time_t now = std::time(nullptr);
  if (now != second_) {
    second_ = now;
    std::tm tm{};
    ::gmtime_r(&now, &tm);
    size_ = std::strftime(text_, sizeof text_, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
  }
  return {text_, size_};
}

std::string_view reason_phrase(int status) noexcept {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 405:
      return "Method Not Allowed";
    case 413:
      return "Content Too Large";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Unknown";
  }
}

void append_response(std::string& out, int status, std::string_view body, bool head, bool close,
                     bool keep_alive_1_0, std::string_view date_line) {
  char number[24];
  out += "HTTP/1.1 ";
  auto [end, ec] = std::to_chars(number, number + sizeof number, status);
  (void)ec;
  out.append(number, end);
  out += ' ';
  out += reason_phrase(status);
  out += "\r\nServer: sockshare\r\n";
  out += date_line;
  if (status == 405) out += "Allow: GET, HEAD\r\n";
  out += "Content-Type: text/plain\r\nContent-Length: ";
  auto [end2, ec2] = std::to_chars(number, number + sizeof number, body.size());
  (void)ec2;
  out.append(number, end2);
  if (close) {
    out += "\r\nConnection: close";
  } else if (keep_alive_1_0) {
    out += "\r\nConnection: keep-alive";
  }
  out += "\r\n\r\n";
  if (!head) out += body;
}

}  // namespace sockshare::cli::http
