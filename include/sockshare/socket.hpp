// What a descriptor is, what a receiver expects it to be, and how to open listeners.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "sockshare/fd.hpp"

namespace sockshare {

// The kernel's view of a descriptor, read with fstat and getsockopt.
struct SocketIdentity {
  bool is_socket = false;
  int family = 0;    // AF_INET, AF_INET6, AF_UNIX, ...
  int type = 0;      // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
  int protocol = 0;  // IPPROTO_TCP, IPPROTO_UDP, 0 for unix
  bool listening = false;
  std::uint64_t cookie = 0;  // SO_COOKIE: unique for the socket's lifetime, 0 if unsupported
  std::uint64_t inode = 0;   // st_ino of the open file, the same in every process holding it
  std::uint64_t device = 0;

  [[nodiscard]] std::string describe() const;  // "tcp6 listener", "unix stream", "pipe", ...
};

[[nodiscard]] SocketIdentity identify(BorrowedFd fd);

// What a receiver accepts (R15). Anything else that arrives is closed and reported.
enum class Expect : std::uint8_t {
  anything,        // any descriptor, sockets or not
  any_socket,      // any socket
  tcp_stream,      // a connected (or connecting) TCP socket, IPv4 or IPv6
  tcp_listener,    // a listening TCP socket
  stream_listener, // a listening TCP or unix stream socket
  stream,          // a TCP or unix stream socket that is not listening
  udp,             // a UDP socket
};

[[nodiscard]] std::string_view to_string(Expect expect) noexcept;

// nullopt when `id` satisfies `expect`, otherwise why it does not.
[[nodiscard]] std::optional<std::string> mismatch(const SocketIdentity& id, Expect expect);

// A listening or connecting endpoint written as text:
//   127.0.0.1:8080   [::1]:8081   :8080 (all IPv4)   unix:/run/app.sock   unix:@abstract-name
struct Endpoint {
  enum class Kind : std::uint8_t { inet, inet6, unix_path, unix_abstract };
  Kind kind = Kind::inet;
  std::string host;  // numeric address, empty for the wildcard
  std::uint16_t port = 0;
  std::string path;  // for unix endpoints, without the '@'

  [[nodiscard]] std::string to_string() const;
};

// Throws Error(invalid_input) naming what is wrong with `text`.
[[nodiscard]] Endpoint parse_endpoint(std::string_view text);

struct ListenOptions {
  int backlog = 1024;
  bool reuse_port = false;  // SO_REUSEPORT, for one listener per worker
  bool nonblocking = true;
  bool unlink_stale = true;  // remove an existing unix socket file that nobody listens on
  // TCP only (TCP_DEFER_ACCEPT): a connection is queued for accept() once its first data has
  // arrived; one that stays silent is held for about this many seconds (the kernel re-sends
  // its SYN-ACK meanwhile) and then queued empty on the client's next ACK. For protocols
  // where the client speaks first (HTTP): the server is not woken for a connection it cannot
  // read yet. 0: off. Not for protocols where the server speaks first (SMTP, SSH, MySQL):
  // their clients would wait out the deferral.
  std::chrono::seconds defer_accept{0};
};

// The TCP_DEFER_ACCEPT setting of a listener, 0 when off or not TCP. The kernel keeps it as
// a count of SYN-ACK retransmissions, so it reads back rounded up along their back-off
// (1 s -> 1 s, 5 s -> 7 s).
[[nodiscard]] std::chrono::seconds defer_accept_of(BorrowedFd listener);

// Opens a close-on-exec listening socket. Port 0 picks a free port: read it back with
// local_endpoint().
[[nodiscard]] Fd listen_on(const Endpoint& endpoint, const ListenOptions& options = {});

// The address a socket is bound to, e.g. to learn the port the kernel picked.
[[nodiscard]] Endpoint local_endpoint(BorrowedFd fd);

// A blocking, close-on-exec connection to `endpoint` (TCP or unix stream).
[[nodiscard]] Fd connect_to(const Endpoint& endpoint);

// Sets or clears O_NONBLOCK. Note (R14): the flag lives on the open file description, so it
// changes every process's copy of a shared socket.
void set_nonblocking(BorrowedFd fd, bool on);

}  // namespace sockshare
