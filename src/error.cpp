#include "sockshare/error.hpp"

#include <cerrno>
#include <cstring>
#include <string>

namespace sockshare {

std::string_view to_string(ErrorKind kind) noexcept {
  switch (kind) {
    case ErrorKind::would_block: return "would block";
    case ErrorKind::timed_out: return "timed out";
    case ErrorKind::overloaded: return "overloaded";
    case ErrorKind::peer_gone: return "peer gone";
    case ErrorKind::refused: return "refused";
    case ErrorKind::invalid_input: return "invalid input";
    case ErrorKind::protocol: return "protocol error";
    case ErrorKind::system: return "system error";
  }
  return "unknown";
}

ErrorKind kind_from_errno(int err) noexcept {
  switch (err) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case EINPROGRESS:
      return ErrorKind::would_block;
    case ETIMEDOUT:
      return ErrorKind::timed_out;
    case EMFILE:
    case ENFILE:
    case ENOBUFS:
    case ENOMEM:
#ifdef ETOOMANYREFS  // not in the Windows C runtime
    case ETOOMANYREFS:
#endif
      return ErrorKind::overloaded;
    case EPIPE:
    case ECONNRESET:
    case ENOTCONN:
    case ESRCH:
    case ECONNABORTED:
      return ErrorKind::peer_gone;
    case EPERM:
    case EACCES:
    case ECONNREFUSED:
      return ErrorKind::refused;
    case EINVAL:
    case EBADF:
    case ENOTSOCK:
    case EMSGSIZE:
    case ENAMETOOLONG:
      return ErrorKind::invalid_input;
    default:
      return ErrorKind::system;
  }
}

std::string errno_name(int err) {
#ifndef _WIN32  // strerrorname_np is glibc's
  if (const char* name = strerrorname_np(err)) return name;
#endif
  return "errno " + std::to_string(err);
}

namespace {
std::string compose(ErrorKind kind, int err, const std::string& operation,
                    std::string_view detail) {
  std::string text = operation;
  text += ": ";
  if (err != 0) {
    text += errno_name(err);
    text += " (";
#ifdef _WIN32
    text += std::strerror(err);
#else
    text += strerrordesc_np(err) ? strerrordesc_np(err) : "unknown error";
#endif
    text += ")";
  } else {
    text += to_string(kind);
  }
  if (!detail.empty()) {
    text += ": ";
    text += detail;
  }
  return text;
}
}  // namespace

Error::Error(ErrorKind kind, int err, std::string operation, std::string_view detail)
    : std::runtime_error(compose(kind, err, operation, detail)),
      kind_(kind),
      errno_(err),
      operation_(std::move(operation)) {}

Error Error::from_errno(std::string operation, int err) {
  return Error(kind_from_errno(err), err, std::move(operation));
}

}  // namespace sockshare
