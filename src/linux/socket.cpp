#include "sockshare/socket.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "linux/sys.hpp"
#include "sockshare/error.hpp"

namespace sockshare {

SocketIdentity identify(BorrowedFd fd) {
  SocketIdentity id;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    SOCKSHARE_THROW_ERRNO("fstat(fd " + std::to_string(fd.get()) + ")");
  }
  id.inode = st.st_ino;
  id.device = st.st_dev;
  id.is_socket = S_ISSOCK(st.st_mode);
  if (!id.is_socket) return id;
  id.family = sys::get_int_option(fd.get(), SOL_SOCKET, SO_DOMAIN).value_or(0);
  id.type = sys::get_int_option(fd.get(), SOL_SOCKET, SO_TYPE).value_or(0);
  id.protocol = sys::get_int_option(fd.get(), SOL_SOCKET, SO_PROTOCOL).value_or(0);
  id.listening = sys::get_int_option(fd.get(), SOL_SOCKET, SO_ACCEPTCONN).value_or(0) != 0;
  std::uint64_t cookie = 0;
  socklen_t len = sizeof cookie;
  if (::getsockopt(fd.get(), SOL_SOCKET, SO_COOKIE, &cookie, &len) == 0) id.cookie = cookie;
  return id;
}

std::string SocketIdentity::describe() const {
  if (!is_socket) return "non-socket descriptor";
  std::string text;
  switch (family) {
    case AF_INET: text = protocol == IPPROTO_UDP ? "udp4" : "tcp4"; break;
    case AF_INET6: text = protocol == IPPROTO_UDP ? "udp6" : "tcp6"; break;
    case AF_UNIX: text = "unix"; break;
    default: text = "family " + std::to_string(family); break;
  }
  switch (type) {
    case SOCK_STREAM: text += family == AF_UNIX ? " stream" : ""; break;
    case SOCK_DGRAM: text += family == AF_UNIX ? " datagram" : ""; break;
    case SOCK_SEQPACKET: text += " seqpacket"; break;
    default: text += " type " + std::to_string(type); break;
  }
  if (listening) text += " listener";
  return text;
}

std::string_view to_string(Expect expect) noexcept {
  switch (expect) {
    case Expect::anything: return "any descriptor";
    case Expect::any_socket: return "a socket";
    case Expect::tcp_stream: return "a TCP stream socket";
    case Expect::tcp_listener: return "a listening TCP socket";
    case Expect::stream_listener: return "a listening stream socket";
    case Expect::stream: return "a connected stream socket";
    case Expect::udp: return "a UDP socket";
  }
  return "?";
}

std::optional<std::string> mismatch(const SocketIdentity& id, Expect expect) {
  const bool inet = id.family == AF_INET || id.family == AF_INET6;
  // SOCK_STREAM alone would let SCTP or MPTCP sockets pass as TCP.
  const bool tcp = id.is_socket && inet && id.type == SOCK_STREAM && id.protocol == IPPROTO_TCP;
  const bool unix_stream = id.is_socket && id.family == AF_UNIX && id.type == SOCK_STREAM;
  bool ok = false;
  switch (expect) {
    case Expect::anything: ok = true; break;
    case Expect::any_socket: ok = id.is_socket; break;
    case Expect::tcp_stream: ok = tcp && !id.listening; break;
    case Expect::tcp_listener: ok = tcp && id.listening; break;
    case Expect::stream_listener: ok = (tcp || unix_stream) && id.listening; break;
    case Expect::stream: ok = (tcp || unix_stream) && !id.listening; break;
    case Expect::udp: ok = id.is_socket && inet && id.type == SOCK_DGRAM; break;
  }
  if (ok) return std::nullopt;
  return "expected " + std::string(to_string(expect)) + ", got " + id.describe();
}

namespace {

[[noreturn]] void bad_endpoint(std::string_view text, std::string_view why) {
  throw Error(ErrorKind::invalid_input, 0, "parse endpoint \"" + std::string(text) + "\"", why);
}

std::uint16_t parse_port(std::string_view text, std::string_view whole) {
  if (text.empty() || text.size() > 5) bad_endpoint(whole, "port must be 0-65535");
  unsigned value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') bad_endpoint(whole, "port must be 0-65535");
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value > 65535) bad_endpoint(whole, "port must be 0-65535");
  return static_cast<std::uint16_t>(value);
}

struct SockAddr {
  sockaddr_storage storage{};
  socklen_t length = 0;
  [[nodiscard]] const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

SockAddr to_sockaddr(const Endpoint& ep) {
  SockAddr out;
  switch (ep.kind) {
    case Endpoint::Kind::inet: {
      auto* sin = reinterpret_cast<sockaddr_in*>(&out.storage);
      sin->sin_family = AF_INET;
      sin->sin_port = htons(ep.port);
      if (ep.host.empty()) {
        sin->sin_addr.s_addr = htonl(INADDR_ANY);
      } else if (::inet_pton(AF_INET, ep.host.c_str(), &sin->sin_addr) != 1) {
        bad_endpoint(ep.host, "not a numeric IPv4 address");
      }
      out.length = sizeof(sockaddr_in);
      break;
    }
    case Endpoint::Kind::inet6: {
      auto* sin6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
      sin6->sin6_family = AF_INET6;
      sin6->sin6_port = htons(ep.port);
      if (ep.host.empty()) {
        sin6->sin6_addr = in6addr_any;
      } else if (::inet_pton(AF_INET6, ep.host.c_str(), &sin6->sin6_addr) != 1) {
        bad_endpoint(ep.host, "not a numeric IPv6 address");
      }
      out.length = sizeof(sockaddr_in6);
      break;
    }
    case Endpoint::Kind::unix_path:
    case Endpoint::Kind::unix_abstract: {
      auto* sun = reinterpret_cast<sockaddr_un*>(&out.storage);
      sun->sun_family = AF_UNIX;
      const bool abstract = ep.kind == Endpoint::Kind::unix_abstract;
      // sun_path holds 108 bytes: a path needs its NUL, an abstract name its leading NUL.
      if (ep.path.empty() || ep.path.size() > sizeof(sun->sun_path) - 1) {
        bad_endpoint(ep.path, "unix socket path empty or longer than 107 bytes");
      }
      std::size_t offset = abstract ? 1 : 0;
      std::memcpy(sun->sun_path + offset, ep.path.data(), ep.path.size());
      out.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + offset +
                                          ep.path.size() + (abstract ? 0 : 1));
      break;
    }
  }
  return out;
}

int family_of(const Endpoint& ep) {
  switch (ep.kind) {
    case Endpoint::Kind::inet: return AF_INET;
    case Endpoint::Kind::inet6: return AF_INET6;
    default: return AF_UNIX;
  }
}

}  // namespace

std::string Endpoint::to_string() const {
  switch (kind) {
    case Kind::inet: return host + ":" + std::to_string(port);
    case Kind::inet6: return "[" + host + "]:" + std::to_string(port);
    case Kind::unix_path: return "unix:" + path;
    case Kind::unix_abstract: return "unix:@" + path;
  }
  return "?";
}

Endpoint parse_endpoint(std::string_view text) {
  Endpoint ep;
  if (text.starts_with("unix:")) {
    std::string_view rest = text.substr(5);
    if (rest.starts_with('@')) {
      ep.kind = Endpoint::Kind::unix_abstract;
      rest.remove_prefix(1);
    } else {
      ep.kind = Endpoint::Kind::unix_path;
    }
    if (rest.empty()) bad_endpoint(text, "empty unix socket path");
    if (rest.size() > 107) bad_endpoint(text, "unix socket path longer than 107 bytes");
    if (rest.find('\0') != std::string_view::npos) bad_endpoint(text, "NUL in unix socket path");
    ep.path = std::string(rest);
    return ep;
  }
  if (text.starts_with('[')) {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      bad_endpoint(text, "IPv6 endpoints are written [address]:port");
    }
    ep.kind = Endpoint::Kind::inet6;
    ep.host = std::string(text.substr(1, close - 1));
    ep.port = parse_port(text.substr(close + 2), text);
    in6_addr probe{};
    if (!ep.host.empty() && ::inet_pton(AF_INET6, ep.host.c_str(), &probe) != 1) {
      bad_endpoint(text, "not a numeric IPv6 address");
    }
    return ep;
  }
  auto colon = text.rfind(':');
  if (colon == std::string_view::npos) bad_endpoint(text, "expected host:port, [v6]:port or unix:path");
  ep.kind = Endpoint::Kind::inet;
  ep.host = std::string(text.substr(0, colon));
  ep.port = parse_port(text.substr(colon + 1), text);
  if (ep.host.find(':') != std::string::npos) bad_endpoint(text, "IPv6 addresses need brackets");
  in_addr probe{};
  if (!ep.host.empty() && ::inet_pton(AF_INET, ep.host.c_str(), &probe) != 1) {
    bad_endpoint(text, "not a numeric IPv4 address");
  }
  return ep;
}

Fd listen_on(const Endpoint& endpoint, const ListenOptions& options) {
  const std::string what = endpoint.to_string();
  int type = SOCK_STREAM | SOCK_CLOEXEC | (options.nonblocking ? SOCK_NONBLOCK : 0);
  Fd fd(::socket(family_of(endpoint), type, 0));
  if (!fd.valid()) SOCKSHARE_THROW_ERRNO("socket for listener " + what);
  int one = 1;
  if (endpoint.kind == Endpoint::Kind::inet || endpoint.kind == Endpoint::Kind::inet6) {
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
      SOCKSHARE_THROW_ERRNO("setsockopt(SO_REUSEADDR) on " + what);
    }
    if (endpoint.kind == Endpoint::Kind::inet6 &&
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0) {
      SOCKSHARE_THROW_ERRNO("setsockopt(IPV6_V6ONLY) on " + what);
    }
  }
  if (options.reuse_port &&
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    SOCKSHARE_THROW_ERRNO("setsockopt(SO_REUSEPORT) on " + what);
  }
  SockAddr addr = to_sockaddr(endpoint);
  if (::bind(fd.get(), addr.get(), addr.length) != 0) {
    int err = errno;
    // A socket file left by a dead server: remove it only if nobody answers on it.
    if (err == EADDRINUSE && endpoint.kind == Endpoint::Kind::unix_path && options.unlink_stale) {
      err = sys::replace_stale_unix_socket(fd.get(), endpoint.path, addr.get(), addr.length);
    }
    if (err != 0) sys::throw_errno("bind(" + what + ")", err);
  }
  if (::listen(fd.get(), options.backlog) != 0) SOCKSHARE_THROW_ERRNO("listen(" + what + ")");
  const bool tcp = endpoint.kind == Endpoint::Kind::inet || endpoint.kind == Endpoint::Kind::inet6;
  if (tcp && options.defer_accept.count() > 0) {
    // The kernel caps it itself (at 255 retransmissions); only the int must not overflow.
    const int seconds = static_cast<int>(
        std::min<std::int64_t>(options.defer_accept.count(), std::numeric_limits<int>::max()));
    if (::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT, &seconds, sizeof seconds) != 0) {
      SOCKSHARE_THROW_ERRNO("setsockopt(TCP_DEFER_ACCEPT) on " + what);
    }
  }
  return fd;
}

std::chrono::seconds defer_accept_of(BorrowedFd listener) {
  int seconds = 0;
  socklen_t len = sizeof seconds;
  if (::getsockopt(listener.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT, &seconds, &len) != 0) {
    // Not TCP (EOPNOTSUPP, ENOPROTOOPT): nothing is deferred.
    return std::chrono::seconds{0};
  }
  return std::chrono::seconds{seconds};
}

Endpoint local_endpoint(BorrowedFd fd) {
  sockaddr_storage storage{};
  socklen_t len = sizeof storage;
  if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&storage), &len) != 0) {
    SOCKSHARE_THROW_ERRNO("getsockname(fd " + std::to_string(fd.get()) + ")");
  }
  Endpoint ep;
  char host[INET6_ADDRSTRLEN] = {};
  if (storage.ss_family == AF_INET) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&storage);
    ::inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
    ep.kind = Endpoint::Kind::inet;
    ep.host = host;
    ep.port = ntohs(sin->sin_port);
  } else if (storage.ss_family == AF_INET6) {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
    ep.kind = Endpoint::Kind::inet6;
    ep.host = host;
    ep.port = ntohs(sin6->sin6_port);
  } else if (storage.ss_family == AF_UNIX) {
    auto* sun = reinterpret_cast<sockaddr_un*>(&storage);
    std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    if (n > 0 && sun->sun_path[0] == '\0') {
      ep.kind = Endpoint::Kind::unix_abstract;
      ep.path.assign(sun->sun_path + 1, n - 1);
    } else {
      ep.kind = Endpoint::Kind::unix_path;
      ep.path = std::string(sun->sun_path, ::strnlen(sun->sun_path, n));
    }
  } else {
    throw Error(ErrorKind::invalid_input, 0, "local_endpoint(fd " + std::to_string(fd.get()) + ")",
                "unsupported address family");
  }
  return ep;
}

Fd connect_to(const Endpoint& endpoint) {
  Fd fd(::socket(family_of(endpoint), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) SOCKSHARE_THROW_ERRNO("socket to connect to " + endpoint.to_string());
  SockAddr addr = to_sockaddr(endpoint);
  if (::connect(fd.get(), addr.get(), addr.length) != 0) {
    int err = errno;
    // An interrupted connect goes on in the background: wait for it and read its outcome.
    if (err == EINTR) {
      sys::wait_ready(fd.get(), POLLOUT, sys::kNoDeadline);
      err = sys::get_int_option(fd.get(), SOL_SOCKET, SO_ERROR).value_or(EIO);
    }
    if (err != 0) sys::throw_errno("connect(" + endpoint.to_string() + ")", err);
  }
  return fd;
}

void set_nonblocking(BorrowedFd fd, bool on) {
  int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0) SOCKSHARE_THROW_ERRNO("fcntl(fd " + std::to_string(fd.get()) + ", F_GETFL)");
  int wanted = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && ::fcntl(fd.get(), F_SETFL, wanted) != 0) {
    SOCKSHARE_THROW_ERRNO("fcntl(fd " + std::to_string(fd.get()) + ", F_SETFL)");
  }
}

}  // namespace sockshare
