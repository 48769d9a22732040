// Errors that say what failed, on what, and what a caller can do about it.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace sockshare {

// What a caller can act on. The errno stays available for logging and finer decisions.
enum class ErrorKind {
  would_block,    // EAGAIN/EWOULDBLOCK: try again when the descriptor is ready
  timed_out,      // a deadline the caller gave passed
  overloaded,     // EMFILE, ENFILE, ENOBUFS, ENOMEM, ETOOMANYREFS: back off, shed load
  peer_gone,      // EPIPE, ECONNRESET, orderly EOF: the other side is not there any more
  refused,        // identity or permission: wrong process, expired or revoked grant, EPERM
  invalid_input,  // the caller passed something unusable (too many fds, oversized payload)
  protocol,       // the peer sent something malformed, truncated or unexpected
  system,         // anything else the OS reported
};

[[nodiscard]] std::string_view to_string(ErrorKind kind) noexcept;

// Maps an errno value to the kind a caller should act on.
[[nodiscard]] ErrorKind kind_from_errno(int err) noexcept;

class Error : public std::runtime_error {
public:
  // `operation` names the call and its operands ("sendmsg(fd 7, 3 fds)"); the message adds
  // the errno name and text when err != 0.
  Error(ErrorKind kind, int err, std::string operation, std::string_view detail = {});

  [[nodiscard]] ErrorKind kind() const noexcept { return kind_; }
  [[nodiscard]] int code() const noexcept { return errno_; }
  [[nodiscard]] const std::string& operation() const noexcept { return operation_; }

  // Builds an Error for the current errno, classifying it.
  [[nodiscard]] static Error from_errno(std::string operation, int err);

private:
  ErrorKind kind_;
  int errno_;
  std::string operation_;
};

// Symbolic name of an errno value ("EPIPE"), or "errno N" for unknown values.
[[nodiscard]] std::string errno_name(int err);

}  // namespace sockshare
