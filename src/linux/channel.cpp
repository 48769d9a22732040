#include "sockshare/channel.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <string>

#include "linux/sys.hpp"

namespace sockshare {
namespace {

std::string fd_op(const char* call, int fd) {
  return std::string(call) + "(fd " + std::to_string(fd) + ")";
}

// Room for a full batch of descriptors plus the credential messages a peer may attach
// (SCM_CREDENTIALS, SCM_PIDFD) if SO_PASSCRED/SO_PASSPIDFD is ever set on the socket, and
// the arrival time (record_arrival_times).
constexpr std::size_t kControlSize = CMSG_SPACE(sizeof(int) * wire::kMaxFds) +
                                     CMSG_SPACE(sizeof(ucred)) + CMSG_SPACE(sizeof(int)) +
                                     CMSG_SPACE(sizeof(timespec));

sockaddr_un unix_address(const Endpoint& ep, socklen_t& length) {
  if (ep.kind != Endpoint::Kind::unix_path && ep.kind != Endpoint::Kind::unix_abstract) {
    throw Error(ErrorKind::invalid_input, 0, "channel endpoint " + ep.to_string(),
                "channels run over unix sockets (unix:/path or unix:@name)");
  }
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  const bool abstract = ep.kind == Endpoint::Kind::unix_abstract;
  if (ep.path.empty() || ep.path.size() > sizeof(sun.sun_path) - 1) {
    throw Error(ErrorKind::invalid_input, 0, "channel endpoint " + ep.to_string(),
                "path empty or longer than 107 bytes");
  }
  std::memcpy(sun.sun_path + (abstract ? 1 : 0), ep.path.data(), ep.path.size());
  length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + ep.path.size() + 1);
  return sun;
}

// What a non-socket descriptor is, so a refusal names what actually arrived (R15).
std::string file_kind(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return "unknown file";
  switch (st.st_mode & S_IFMT) {
    case S_IFIFO: return "pipe or FIFO";
    case S_IFREG: return "regular file";
    case S_IFDIR: return "directory";
    case S_IFCHR: return "character device";
    case S_IFBLK: return "block device";
    case S_IFLNK: return "symbolic link";
    case 0: return "anonymous inode (eventfd, epoll, timerfd, pidfd, ...)";
    default: return "file of mode " + std::to_string(st.st_mode & S_IFMT);
  }
}

// R11/R15: checks one received descriptor against what the receiver accepts. Cheap when
// the receiver accepts anything but unix sockets: one getsockopt.
std::optional<std::string> unacceptable(int fd, const ReceiveOptions& options) {
  if (options.expect == Expect::anything) {
    if (options.allow_unix_sockets) return std::nullopt;
    auto domain = sys::get_int_option(fd, SOL_SOCKET, SO_DOMAIN);
    if (domain && *domain == AF_UNIX) return "unix socket descriptors are not allowed (R11)";
    return std::nullopt;
  }
  // The common expectations answered with one syscall: TCP_INFO succeeds only on a TCP
  // socket (of either family) and tells its state. identify() then only words the error.
  const bool wants_listener =
      options.expect == Expect::tcp_listener || options.expect == Expect::stream_listener;
  if (wants_listener || options.expect == Expect::tcp_stream || options.expect == Expect::stream) {
    std::uint8_t state = 0;  // tcpi_state, the first byte of struct tcp_info
    socklen_t len = sizeof state;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &state, &len) == 0 && len == sizeof state &&
        (state == TCP_LISTEN) == wants_listener) {
      return std::nullopt;
    }
  }
  SocketIdentity id = identify(BorrowedFd(fd));
  if (id.is_socket && id.family == AF_UNIX && !options.allow_unix_sockets) {
    return "unix socket descriptors are not allowed (R11), got " + id.describe();
  }
  auto why = mismatch(id, options.expect);
  if (why && !id.is_socket) *why += " (" + file_kind(fd) + ")";
  return why;
}

// The peer shut down its sending side (or is gone). Distinguishes the end of the stream
// from a zero-length message, which reads as 0 bytes too (R4).
bool peer_finished(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  const int n = sys::retry_eintr([&] { return ::poll(&p, 1, 0); });
  return n < 0 || (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// After MSG_CTRUNC: 0 if this process still has a free descriptor slot, otherwise the
// errno (EMFILE/ENFILE) that shows the kernel dropped descriptors for lack of slots (R9).
// The descriptors that did arrive are still open at this point, so a full table stays full.
int descriptor_table_full(int fd) {
  Fd probe(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (probe.valid()) return 0;
  return errno == EMFILE || errno == ENFILE ? errno : 0;
}

}  // namespace

Channel::Channel(Fd socket) : socket_(std::move(socket)) {
  const int fd = socket_.get();
  auto domain = sys::get_int_option(fd, SOL_SOCKET, SO_DOMAIN);
  auto type = sys::get_int_option(fd, SOL_SOCKET, SO_TYPE);
  if (!domain || !type || *domain != AF_UNIX || *type != SOCK_SEQPACKET) {
    throw Error(ErrorKind::invalid_input, 0, fd_op("Channel", fd),
                "a channel needs a connected AF_UNIX SOCK_SEQPACKET socket");
  }
  set_nonblocking(socket_.borrow(), true);
}

Channel::Channel(Channel&& other) noexcept
    : socket_(std::move(other.socket_)),
      seq_(other.seq_.load(std::memory_order_relaxed)),
      receive_buffer_(std::move(other.receive_buffer_)) {}

Channel& Channel::operator=(Channel&& other) noexcept {
  if (this != &other) {
    socket_ = std::move(other.socket_);
    seq_.store(other.seq_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    receive_buffer_ = std::move(other.receive_buffer_);
  }
  return *this;
}

std::pair<Channel, Channel> Channel::pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds) != 0) {
    SOCKSHARE_THROW_ERRNO("socketpair(AF_UNIX, SOCK_SEQPACKET)");
  }
  Fd a(fds[0]);
  Fd b(fds[1]);
  return {Channel(std::move(a)), Channel(std::move(b))};
}

Channel Channel::connect(const Endpoint& endpoint, std::chrono::milliseconds timeout) {
  socklen_t length = 0;
  sockaddr_un sun = unix_address(endpoint, length);
  // A blocking connect waits for room in a full backlog; SO_SNDTIMEO bounds that wait
  // (unix connect honours it) so no retry loop is needed. The Channel switches the socket
  // to non-blocking afterwards.
  Fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    const int err = errno;
    sys::throw_errno("socket(AF_UNIX, SOCK_SEQPACKET)", err);
  }
  auto set_send_timeout = [&](std::chrono::milliseconds t) {
    timeval tv{};
    if (t.count() > 0) {
      tv.tv_sec = static_cast<time_t>(t.count() / 1000);
      tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
    } else if (t.count() == 0) {
      tv.tv_usec = 1;  // 0 would mean "wait forever"
    }
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  };
  if (timeout.count() >= 0) set_send_timeout(timeout);
  if (sys::retry_eintr([&] {
        return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sun), length);
      }) != 0) {
    const int err = errno;
    const std::string op = "connect(" + endpoint.to_string() + ")";
    if (err == EAGAIN || err == EINPROGRESS) {
      throw Error(ErrorKind::timed_out, 0, op, "the listener's backlog stayed full");
    }
    sys::throw_errno(op, err);
  }
  if (timeout.count() >= 0) set_send_timeout(std::chrono::milliseconds(-1));
  return Channel(std::move(fd));
}

std::optional<std::uint64_t> Channel::try_send(const Outgoing& message) {
  const int fd = socket_.get();
  if (message.fds.size() > wire::kMaxFds) {
    throw Error(ErrorKind::invalid_input, 0, fd_op("channel send", fd),
                std::to_string(message.fds.size()) +
                    " descriptors in one message; the kernel takes at most 253 (R8)");
  }
  if (!message.fd_meta.empty() && message.fd_meta.size() != message.fds.size()) {
    throw Error(ErrorKind::invalid_input, 0, fd_op("channel send", fd),
                "descriptor metadata needs exactly one entry per descriptor");
  }
  const std::size_t meta_size =
      message.fd_meta.empty() ? 0 : wire::metadata_size(message.fd_meta);
  const std::size_t total = wire::kHeaderSize + meta_size + message.payload.size();
  if (total > wire::kMaxMessage) {
    throw Error(ErrorKind::invalid_input, 0, fd_op("channel send", fd),
                "message of " + std::to_string(total) + " bytes exceeds the " +
                    std::to_string(wire::kMaxMessage) + "-byte limit");
  }

  wire::Header header;
  header.type = message.type;
  header.fd_count = static_cast<std::uint8_t>(message.fds.size());
  header.payload_len = static_cast<std::uint32_t>(message.payload.size());
  std::vector<std::byte> meta;
  if (!message.fd_meta.empty()) {
    header.flags |= wire::kFlagFdMeta;
    header.meta_len = static_cast<std::uint32_t>(meta_size);
    wire::encode_metadata(message.fd_meta, meta);
  }
  std::array<std::byte, wire::kHeaderSize> head{};

  std::array<iovec, 3> iov{};
  int iov_count = 0;
  iov[iov_count++] = {head.data(), head.size()};
  if (!meta.empty()) iov[iov_count++] = {meta.data(), meta.size()};
  if (!message.payload.empty()) {
    iov[iov_count++] = {const_cast<std::byte*>(message.payload.data()), message.payload.size()};
  }

  // Only the part handed to the kernel is cleared: zeroing the whole buffer per message
  // showed up in profiles of one-descriptor sends.
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * wire::kMaxFds)> control;
  msghdr msg{};
  msg.msg_iov = iov.data();
  msg.msg_iovlen = static_cast<std::size_t>(iov_count);
  if (!message.fds.empty()) {
    const std::size_t bytes = sizeof(int) * message.fds.size();
    std::memset(control.data(), 0, CMSG_SPACE(bytes));
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(bytes);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(bytes);
    auto* out = reinterpret_cast<int*>(CMSG_DATA(cmsg));
    for (std::size_t i = 0; i < message.fds.size(); ++i) out[i] = message.fds[i].get();
  }

  // The number is chosen and the message sent under one lock: numbers reach the wire in
  // order and without gaps even with several sending threads. sendmsg never blocks here.
  std::lock_guard lock(send_mutex_);
  header.seq = seq_.load(std::memory_order_relaxed) + 1;
  wire::encode_header(header, head);
  // SEQPACKET sends a message whole or not at all, so descriptors can never go out twice
  // on a partial write (libuv #2086). MSG_NOSIGNAL: a dead peer must be an error, never
  // SIGPIPE (R13). Linux 6.18 happens to raise SIGPIPE only on STREAM sockets; the flag
  // makes the guarantee ours instead of an accident of the kernel version.
  const ssize_t n = sys::retry_eintr(
      [&] { return sys::seam().sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT); });
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return std::nullopt;
    SOCKSHARE_THROW_ERRNO("sendmsg(fd " + std::to_string(fd) + ", " +
                     std::to_string(message.fds.size()) + " fds, " + std::to_string(total) +
                     " bytes)");
  }
  seq_.store(header.seq, std::memory_order_relaxed);
  return header.seq;
}

std::uint64_t Channel::send(const Outgoing& message, std::chrono::milliseconds timeout) {
  // Most sends go out at once: read the clock only when we have to wait.
  if (auto seq = try_send(message)) return *seq;
  const auto deadline = sys::deadline_after(timeout);
  for (;;) {
    if (!sys::wait_ready(socket_.get(), POLLOUT, deadline)) {
      throw Error(ErrorKind::timed_out, 0, fd_op("channel send", socket_.get()),
                  "the peer is not reading");
    }
    if (auto seq = try_send(message)) return *seq;
  }
}

bool Channel::try_receive(Message& out, const ReceiveOptions& options) {
  const int fd = socket_.get();
  // One byte more than the largest valid message, so an oversized one shows as MSG_TRUNC.
  if (receive_buffer_.size() != wire::kMaxMessage + 1) receive_buffer_.resize(wire::kMaxMessage + 1);
  alignas(cmsghdr) std::array<char, kControlSize> control;
  iovec iov{receive_buffer_.data(), receive_buffer_.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  // Room for every descriptor one message can carry (clear() keeps the capacity), so
  // wrapping them below never allocates: a failed allocation there would leave raw
  // descriptors unowned.
  out.fds.reserve(wire::kMaxFds + 2);

  // MSG_CMSG_CLOEXEC: a descriptor must never be inheritable, not even for an instant (R7).
  // Never MSG_PEEK: each peek with a control buffer installs fresh duplicates (R6).
  const ssize_t n = sys::retry_eintr(
      [&] { return sys::seam().recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    SOCKSHARE_THROW_ERRNO(fd_op("recvmsg", fd));
  }

  // Own every descriptor before looking at anything else, so each error path below closes
  // them all by unwinding (R1, R2, R5, R9, R15).
  out.fds.clear();
  out.queued_realtime_ns = 0;
  std::optional<Fd> peer_pidfd;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    if (c->cmsg_type == SCM_TIMESTAMPNS && c->cmsg_len >= CMSG_LEN(sizeof(timespec))) {
      timespec queued{};
      std::memcpy(&queued, CMSG_DATA(c), sizeof queued);
      out.queued_realtime_ns = std::int64_t{queued.tv_sec} * 1'000'000'000 + queued.tv_nsec;
      continue;
    }
    if (c->cmsg_type != SCM_RIGHTS && c->cmsg_type != SCM_PIDFD) continue;
    if (c->cmsg_len < CMSG_LEN(0)) continue;
    // R2: count from cmsg_len, never from the header; the kernel merges several
    // SCM_RIGHTS messages of one send into one.
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* data = reinterpret_cast<const unsigned char*>(CMSG_DATA(c));
    for (std::size_t i = 0; i < count; ++i) {
      int received = -1;
      std::memcpy(&received, data + i * sizeof(int), sizeof(int));
      if (c->cmsg_type == SCM_RIGHTS) out.fds.emplace_back(received);
      else peer_pidfd.emplace(received);  // closed on return: the channel does not ask for it
    }
  }

  // The error text is built only on error paths: formatting it for every message cost
  // about as much user-space time as the rest of the receive path together.
  auto op = [fd] { return fd_op("channel receive", fd); };
  auto reject = [&](ErrorKind kind, std::string_view why, std::uint16_t type = 0,
                    std::uint64_t seq = 0) {
    out.fds.clear();
    throw ChannelError(kind, 0, op(), why, type, seq);
  };

  if (n == 0) {
    // R4: a zero-length SEQPACKET message reads as 0 too; every sockshare message has a
    // header, so 0 with descriptors is a broken peer, and 0 without is end of stream only
    // if the peer really shut down its side.
    if (!out.fds.empty()) {
      reject(ErrorKind::protocol, "zero-length message carrying descriptors (R4)");
    }
    if (!peer_finished(fd)) reject(ErrorKind::protocol, "zero-length message (R4)");
    throw Error(ErrorKind::peer_gone, 0, op(), "the peer closed the channel");
  }
  if (msg.msg_flags & MSG_TRUNC) reject(ErrorKind::protocol, "oversized message truncated (R5)");

  wire::Header header;
  const auto bytes = std::span<const std::byte>(receive_buffer_.data(), static_cast<std::size_t>(n));
  if (auto decoded = wire::decode_header(bytes, bytes.size(), header); !decoded.ok) {
    reject(ErrorKind::protocol, decoded.error);
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    // The kernel closed what did not fit (R1). Our control buffer has room for a full
    // batch, so normally this means the descriptor table is full (R9): report overloaded
    // so a dispatcher backs off. Anything else is a truncation we cannot explain.
    const std::string lost = "descriptors lost in transit (MSG_CTRUNC): " +
                             std::to_string(out.fds.size()) + " of " +
                             std::to_string(header.fd_count) + " arrived";
    if (const int err = descriptor_table_full(fd); err != 0) {
      out.fds.clear();
      throw ChannelError(ErrorKind::overloaded, err, op(), lost + "; at RLIMIT_NOFILE (R9)",
                         header.type, header.seq);
    }
    reject(ErrorKind::protocol, lost + " (R1)", header.type, header.seq);
  }
  if (out.fds.size() != header.fd_count) {
    reject(ErrorKind::protocol,
           "header announces " + std::to_string(header.fd_count) + " descriptors but " +
               std::to_string(out.fds.size()) + " arrived (R2)",
           header.type, header.seq);
  }
  if (out.fds.size() > options.max_fds) {
    reject(ErrorKind::protocol,
           std::to_string(out.fds.size()) + " descriptors where at most " +
               std::to_string(options.max_fds) + " are accepted",
           header.type, header.seq);
  }
  for (std::size_t i = 0; i < out.fds.size(); ++i) {
    std::optional<std::string> why;
    try {
      why = unacceptable(out.fds[i].get(), options);
    } catch (const Error& e) {
      // Cannot be checked, so cannot be accepted; the message is consumed either way.
      why = std::string("cannot be inspected: ") + e.what();
    }
    if (why) {
      reject(ErrorKind::protocol, "descriptor " + std::to_string(i) + ": " + *why, header.type,
             header.seq);
    }
  }

  const std::size_t meta_offset = wire::kHeaderSize;
  const std::size_t payload_offset = meta_offset + header.meta_len;
  if (header.flags & wire::kFlagFdMeta) {
    auto decoded =
        wire::decode_metadata(bytes.subspan(meta_offset, header.meta_len), header.fd_count, out.fd_meta);
    if (!decoded.ok) reject(ErrorKind::protocol, decoded.error, header.type, header.seq);
  } else {
    out.fd_meta.clear();
  }
  out.type = header.type;
  out.seq = header.seq;
  out.payload.assign(bytes.begin() + static_cast<std::ptrdiff_t>(payload_offset), bytes.end());
  return true;
}

std::optional<Message> Channel::try_receive(const ReceiveOptions& options) {
  Message message;
  if (!try_receive(message, options)) return std::nullopt;
  return message;
}

void Channel::receive(Message& out, const ReceiveOptions& options,
                      std::chrono::milliseconds timeout) {
  if (try_receive(out, options)) return;
  const auto deadline = sys::deadline_after(timeout);
  for (;;) {
    if (!sys::wait_ready(socket_.get(), POLLIN, deadline)) {
      throw Error(ErrorKind::timed_out, 0, fd_op("channel receive", socket_.get()),
                  "no message before the deadline");
    }
    if (try_receive(out, options)) return;
  }
}

Message Channel::receive(const ReceiveOptions& options, std::chrono::milliseconds timeout) {
  Message message;
  receive(message, options, timeout);
  return message;
}

bool Channel::refuse_descriptors() {
  int zero = 0;
  if (::setsockopt(socket_.get(), SOL_SOCKET, SO_PASSRIGHTS, &zero, sizeof zero) == 0) return true;
  if (errno == ENOPROTOOPT || errno == EINVAL) return false;
  SOCKSHARE_THROW_ERRNO(fd_op("setsockopt(SO_PASSRIGHTS)", socket_.get()));
}

void Channel::record_arrival_times() {
  int one = 1;
  if (::setsockopt(socket_.get(), SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) != 0) {
    SOCKSHARE_THROW_ERRNO(fd_op("setsockopt(SO_TIMESTAMPNS)", socket_.get()));
  }
}

PeerCredentials Channel::peer_credentials() const {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(socket_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    SOCKSHARE_THROW_ERRNO(fd_op("getsockopt(SO_PEERCRED)", socket_.get()));
  }
  return {cred.pid, cred.uid, cred.gid};
}

std::optional<Fd> Channel::peer_pidfd() const {
  int pidfd = -1;
  socklen_t len = sizeof pidfd;
  if (::getsockopt(socket_.get(), SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) != 0) {
    if (errno == ENOPROTOOPT) return std::nullopt;
    SOCKSHARE_THROW_ERRNO(fd_op("getsockopt(SO_PEERPIDFD)", socket_.get()));
  }
  // The kernel creates it with O_CLOEXEC already.
  return Fd(pidfd);
}

void Channel::shutdown_send() {
  if (::shutdown(socket_.get(), SHUT_WR) != 0 && errno != ENOTCONN) {
    SOCKSHARE_THROW_ERRNO(fd_op("shutdown(SHUT_WR)", socket_.get()));
  }
}

ChannelListener ChannelListener::listen(const Endpoint& endpoint, int backlog, unsigned mode) {
  socklen_t length = 0;
  sockaddr_un sun = unix_address(endpoint, length);
  ChannelListener listener;
  listener.endpoint_ = endpoint;
  listener.socket_ = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listener.socket_.valid()) SOCKSHARE_THROW_ERRNO("socket(AF_UNIX, SOCK_SEQPACKET)");
  const bool path = endpoint.kind == Endpoint::Kind::unix_path;
  // Bound with its final mode: there is no window in which others could connect.
  const int err = path ? sys::bind_unix_with_mode(listener.socket_.get(),
                                                  reinterpret_cast<sockaddr*>(&sun), length, mode)
                       : (::bind(listener.socket_.get(), reinterpret_cast<sockaddr*>(&sun),
                                 length) == 0 ? 0 : errno);
  if (err != 0) sys::throw_errno("bind(" + endpoint.to_string() + ")", err);
  if (path) {
    struct stat st {};
    if (::stat(endpoint.path.c_str(), &st) == 0) listener.inode_ = st.st_ino;
  }
  if (::listen(listener.socket_.get(), backlog) != 0) {
    SOCKSHARE_THROW_ERRNO("listen(" + endpoint.to_string() + ")");
  }
  return listener;
}

ChannelListener& ChannelListener::operator=(ChannelListener&& other) noexcept {
  if (this != &other) {
    remove_path();
    socket_ = std::move(other.socket_);
    endpoint_ = std::move(other.endpoint_);
    inode_ = std::exchange(other.inode_, 0);
  }
  return *this;
}

ChannelListener::~ChannelListener() { remove_path(); }

void ChannelListener::remove_path() noexcept {
  if (inode_ == 0 || !socket_.valid()) return;
  struct stat st {};
  // Never unlink a socket file a newer server has put at the same path.
  if (::stat(endpoint_.path.c_str(), &st) == 0 && st.st_ino == inode_) {
    ::unlink(endpoint_.path.c_str());
  }
  inode_ = 0;
}

std::optional<Channel> ChannelListener::try_accept() {
  const int fd = sys::retry_eintr([&] {
    return sys::seam().accept4(socket_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  });
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return std::nullopt;
    SOCKSHARE_THROW_ERRNO(fd_op("accept4", socket_.get()));
  }
  return Channel(Fd(fd));
}

Channel ChannelListener::accept(std::chrono::milliseconds timeout) {
  const auto deadline = sys::deadline_after(timeout);
  for (;;) {
    if (auto channel = try_accept()) return std::move(*channel);
    if (!sys::wait_ready(socket_.get(), POLLIN, deadline)) {
      throw Error(ErrorKind::timed_out, 0, fd_op("channel accept", socket_.get()));
    }
  }
}

}  // namespace sockshare
