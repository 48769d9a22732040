// The channel: framed messages carrying descriptors and per-descriptor metadata over a
// connected AF_UNIX SOCK_SEQPACKET socket. Every other part of sockshare that moves a
// descriptor speaks through this class; it is the only place recvmsg is called.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "sockshare/error.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/wire.hpp"

namespace sockshare {

inline constexpr std::chrono::milliseconds kForever{-1};

// What the receiver will take. Anything outside it is closed before the caller sees it.
struct ReceiveOptions {
  Expect expect = Expect::anything;  // R15: each descriptor must be this
  bool allow_unix_sockets = false;   // R11: AF_UNIX descriptors are refused unless allowed
  std::size_t max_fds = wire::kMaxFds;  // more than this in one message is refused
};

// A received message. Every descriptor is owned and close-on-exec.
struct Message {
  std::uint16_t type = 0;
  std::uint64_t seq = 0;
  std::vector<std::byte> payload;
  std::vector<Fd> fds;
  // One entry per descriptor when the sender attached metadata, otherwise empty.
  std::vector<std::vector<std::byte>> fd_meta;
  // When the peer's send queued it (CLOCK_REALTIME, ns), if the receiving channel asked for
  // it with record_arrival_times(); otherwise 0.
  std::int64_t queued_realtime_ns = 0;

  [[nodiscard]] std::string_view payload_text() const {
    return {reinterpret_cast<const char*>(payload.data()), payload.size()};
  }
};

// A message to send. Descriptors are borrowed: the caller keeps its copies.
struct Outgoing {
  std::uint16_t type = 0;
  std::span<const std::byte> payload = {};
  std::span<const BorrowedFd> fds = {};
  // Empty, or exactly one entry (possibly empty) per descriptor.
  std::span<const std::span<const std::byte>> fd_meta = {};
};

// A receive failure that consumed a message: carries what is known of it so a protocol
// layer can answer (e.g. a negative acknowledgement for `seq`).
class ChannelError : public Error {
public:
  ChannelError(ErrorKind kind, int err, std::string operation, std::string_view detail,
               std::uint16_t type, std::uint64_t seq)
      : Error(kind, err, std::move(operation), detail), type_(type), seq_(seq) {}
  [[nodiscard]] std::uint16_t message_type() const noexcept { return type_; }
  [[nodiscard]] std::uint64_t message_seq() const noexcept { return seq_; }  // 0 if unknown

private:
  std::uint16_t type_;
  std::uint64_t seq_;
};

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// Thread safety: sends may be issued from several threads at once (each message is one
// atomic sendmsg, and sequence numbers go out in the order of the messages); receives must
// come from one thread at a time.
//
// Descriptor sharing caveats a caller must know:
// - A sent descriptor and the received one share one open file description (R14): file
//   status flags such as O_NONBLOCK set by either side change both. Descriptor flags
//   (FD_CLOEXEC) are per descriptor. Never rely on the other side's blocking mode.
// - A successful send only means the kernel queued the message (R9, R12): the receiver may
//   still lose the descriptors (RLIMIT_NOFILE, death). Keep your copy until the protocol
//   on top acknowledges the message, then close it.
class Channel {
public:
  Channel() = default;
  // Adopts a connected AF_UNIX SOCK_SEQPACKET socket; throws invalid_input for anything else.
  // The socket is switched to non-blocking; blocking calls wait with poll.
  explicit Channel(Fd socket);
  Channel(Channel&& other) noexcept;
  Channel& operator=(Channel&& other) noexcept;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel() = default;

  // Two connected ends, both close-on-exec.
  [[nodiscard]] static std::pair<Channel, Channel> pair();
  // Connects to a ChannelListener at a unix path or abstract name.
  [[nodiscard]] static Channel connect(const Endpoint& endpoint,
                                       std::chrono::milliseconds timeout = kForever);

  [[nodiscard]] bool valid() const noexcept { return socket_.valid(); }
  // Poll this for POLLIN (a message or EOF is waiting) or POLLOUT (room to send).
  [[nodiscard]] BorrowedFd native_handle() const noexcept { return socket_.borrow(); }
  // Gives the socket back, e.g. to pass the channel itself to a child process.
  [[nodiscard]] Fd release() noexcept { return std::move(socket_); }

  // Sends one message. Returns its sequence number (1, 2, 3, ... with no gaps: a message
  // that was not sent does not use one), or nullopt if the socket buffer is full (nothing
  // was sent). Throws invalid_input for more than 253 descriptors or an oversized message
  // (before any syscall), overloaded for ETOOMANYREFS/ENOBUFS (R10), peer_gone when the
  // peer closed, refused when the peer refuses descriptors (R16). Never raises SIGPIPE.
  std::optional<std::uint64_t> try_send(const Outgoing& message);
  // Blocks until sent; throws timed_out when the timeout passes first.
  std::uint64_t send(const Outgoing& message, std::chrono::milliseconds timeout = kForever);

  // Receives one message into `out`, reusing its storage. Returns false if none is waiting.
  // Throws peer_gone at end of stream; protocol for malformed, truncated or unexpected
  // messages (after closing every descriptor that came with them); overloaded when
  // descriptors were lost because this process is at RLIMIT_NOFILE (R9). A failed receive
  // consumes exactly one message and leaves the channel usable. Never peeks (R6).
  bool try_receive(Message& out, const ReceiveOptions& options = {});
  [[nodiscard]] std::optional<Message> try_receive(const ReceiveOptions& options = {});
  // Blocks until a message arrives; throws timed_out when the timeout passes first.
  [[nodiscard]] Message receive(const ReceiveOptions& options = {},
                                std::chrono::milliseconds timeout = kForever);
  void receive(Message& out, const ReceiveOptions& options = {},
               std::chrono::milliseconds timeout = kForever);

  // R16: asks the kernel to refuse descriptors sent to this end (SO_PASSRIGHTS=0, Linux
  // 6.16+; the sender gets EPERM). Returns false where the kernel lacks it; receives still
  // close and reject what arrives when ReceiveOptions::max_fds is 0.
  bool refuse_descriptors();

  // Has the kernel stamp each message as it is queued (SO_TIMESTAMPNS), read back as
  // Message::queued_realtime_ns: a reader that gets to a message late still knows when it came.
  void record_arrival_times();

  // Who is on the other end (SO_PEERCRED, as of connect or socketpair).
  [[nodiscard]] PeerCredentials peer_credentials() const;
  // A pidfd for the peer process (SO_PEERPIDFD, Linux 6.5+), immune to PID reuse (R17).
  // nullopt where the kernel lacks it.
  [[nodiscard]] std::optional<Fd> peer_pidfd() const;

  // Shuts down the sending direction; the peer sees end of stream after what was queued.
  void shutdown_send();

private:
  Fd socket_;
  // Last sequence number sent. Written only under send_mutex_, which also spans the
  // sendmsg, so numbers reach the wire in order and a refused send does not use one.
  std::atomic<std::uint64_t> seq_{0};
  std::mutex send_mutex_;
  std::vector<std::byte> receive_buffer_;
};

// Accepts channel connections on a unix path or abstract name.
class ChannelListener {
public:
  ChannelListener() = default;
  // A path socket is created with the given permission bits (default owner-only) and
  // removed again by the destructor if it is still the same file.
  [[nodiscard]] static ChannelListener listen(const Endpoint& endpoint, int backlog = 128,
                                              unsigned mode = 0600);
  ChannelListener(ChannelListener&&) noexcept = default;
  ChannelListener& operator=(ChannelListener&&) noexcept;
  ~ChannelListener();

  [[nodiscard]] BorrowedFd native_handle() const noexcept { return socket_.borrow(); }
  [[nodiscard]] const Endpoint& endpoint() const noexcept { return endpoint_; }
  [[nodiscard]] std::optional<Channel> try_accept();
  [[nodiscard]] Channel accept(std::chrono::milliseconds timeout = kForever);

private:
  void remove_path() noexcept;

  Fd socket_;
  Endpoint endpoint_;
  std::uint64_t inode_ = 0;  // of the socket file we created, so we never unlink another's
};

}  // namespace sockshare
