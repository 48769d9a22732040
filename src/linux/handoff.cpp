// Listener handoff between generations over a Channel: the holder's HandoffServer and the
// taker's HandoffClient. docs/HANDOFF.md describes the protocol and its guarantees.
#include "sockshare/handoff.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <exception>
#include <set>
#include <string>

#include "linux/sys.hpp"
#include "sockshare/systemd.hpp"

namespace sockshare::handoff {
namespace {

using Clock = std::chrono::steady_clock;

// pidfs (6.9+) gives every process its own inode; 0 where pidfds share one anonymous inode.
std::uint64_t pidfs_inode(int pidfd) {
  struct statfs sfs {};
  if (::fstatfs(pidfd, &sfs) != 0 || static_cast<unsigned long>(sfs.f_type) != PID_FS_MAGIC) {
    return 0;
  }
  struct stat st {};
  if (::fstat(pidfd, &st) != 0) return 0;
  return st.st_ino;
}

// The pid a pidfd refers to, from /proc/self/fdinfo: -1 once the process has exited,
// 0 when it cannot be read.
pid_t pidfd_pid(int pidfd) {
  const std::string path = "/proc/self/fdinfo/" + std::to_string(pidfd);
  Fd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!file.valid()) return 0;
  std::array<char, 1024> buffer{};
  const ssize_t n = sys::retry_eintr([&] { return ::read(file.get(), buffer.data(), buffer.size() - 1); });
  if (n <= 0) return 0;
  std::string_view text(buffer.data(), static_cast<std::size_t>(n));
  const auto at = text.find("\nPid:");
  if (at == std::string_view::npos) return 0;
  std::size_t i = at + 5;
  while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  bool negative = false;
  if (i < text.size() && text[i] == '-') {
    negative = true;
    ++i;
  }
  long value = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9' && value < 0x7FFFFFFF) {
    value = value * 10 + (text[i++] - '0');
  }
  return negative ? -1 : static_cast<pid_t>(value);
}

// Checks the process on the other end of `channel` (R17, R18). Returns why it is not
// acceptable, or nullopt. `pid_out` receives SO_PEERCRED's pid for reports.
std::optional<std::string> check_peer(const Channel& channel, const PeerCheck& check,
                                      std::string_view role, pid_t& pid_out) {
  const PeerCredentials creds = channel.peer_credentials();
  pid_out = creds.pid;
  if (creds.uid != ::geteuid()) {
    return std::string(role) + " pid " + std::to_string(creds.pid) + " runs as uid " +
           std::to_string(creds.uid) + ", this process as uid " + std::to_string(::geteuid());
  }
  if (!check.pid && !check.pidfd.valid()) return std::nullopt;
  // SO_PEERPIDFD pins the process that connected: a pid read from it cannot belong to a
  // process that reused the number after the peer died.
  std::optional<Fd> peer = channel.peer_pidfd();
  const pid_t peer_pid = peer ? pidfd_pid(peer->get()) : creds.pid;
  if (peer_pid <= 0) return std::string(role) + " pid " + std::to_string(creds.pid) + " has exited";
  if (check.pidfd.valid()) {
    const std::uint64_t expected = pidfs_inode(check.pidfd.get());
    const std::uint64_t actual = peer ? pidfs_inode(peer->get()) : 0;
    const bool same = expected != 0 && actual != 0 ? expected == actual
                                                   : pidfd_pid(check.pidfd.get()) == peer_pid;
    if (!same) {
      return std::string(role) + " pid " + std::to_string(peer_pid) +
             " is not the process of the expected pidfd (pid " +
             std::to_string(pidfd_pid(check.pidfd.get())) + ")";
    }
  }
  if (check.pid && *check.pid != peer_pid) {
    return std::string(role) + " is pid " + std::to_string(peer_pid) + ", expected pid " +
           std::to_string(*check.pid);
  }
  return std::nullopt;
}

std::uint64_t path_inode(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return 0;
  return st.st_ino;
}

void require_private_directory(const std::string& path) {
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) sys::throw_errno("stat(" + dir + ")");
  if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error(ErrorKind::refused, 0, "handoff control socket unix:" + path,
                "its directory " + dir + " (mode " + mode + ", uid " + std::to_string(st.st_uid) +
                    ") must be owned by uid " + std::to_string(::geteuid()) +
                    " with mode 0700, or another user could replace the socket (R18)");
  }
}

std::string describe_meta(const ListenerMeta& meta) {
  return "\"" + meta.name + "\" (" + meta.endpoint + ")";
}

// Why the received descriptor does not match what the holder said about it, or nullopt.
std::optional<std::string> meta_mismatch(const ListenerMeta& meta, const SocketIdentity& id) {
  if (!id.is_socket) return "not a socket";
  if (id.family != meta.family || id.type != meta.type || id.protocol != meta.protocol) {
    return "is a " + id.describe() + ", metadata says family " + std::to_string(meta.family) +
           " type " + std::to_string(meta.type) + " protocol " + std::to_string(meta.protocol);
  }
  if (meta.cookie != 0 && id.cookie != 0 && meta.cookie != id.cookie) {
    return "socket cookie differs from the holder's: not the same socket (R15)";
  }
  const bool connection_oriented = id.type == SOCK_STREAM || id.type == SOCK_SEQPACKET;
  if (connection_oriented && !id.listening) return "is not listening";
  if (meta.control && (id.family != AF_UNIX || id.type != SOCK_SEQPACKET)) {
    return "marked as the control listener but is a " + id.describe();
  }
  if (!meta.control && id.family == AF_UNIX && id.type == SOCK_SEQPACKET && id.listening) {
    // A channel listener among the application's listeners would be accepted on by the
    // application; only the control entry may be one.
    return "a unix seqpacket listener not marked as the control listener";
  }
  return std::nullopt;
}

enum class Wait { message, timed_out, failed };

// Channel::receive, except that a connection reset does not hide a message that arrived
// before it. When a peer closes with our unread data in its queue, the kernel flags the
// reset (ECONNRESET) on our socket and reports it before the messages already queued for
// us; the first recvmsg clears the flag, so one more non-blocking attempt finds the last
// words of a holder that refused us and hung up.
void receive_pending(Channel& channel, Message& message, const ReceiveOptions& options,
                     std::chrono::milliseconds timeout) {
  try {
    channel.receive(message, options, timeout);
  } catch (const ChannelError&) {
    throw;
  } catch (const Error& e) {
    if (e.code() != ECONNRESET || !channel.try_receive(message, options)) throw;
  }
}

// Sends the refusal, then lets the peer read it: shutting down our side and discarding what
// the peer already sent keeps the close from turning into a reset that could hide it.
void send_refusal(Channel& channel, Reason reason, const std::string& text) noexcept {
  try {
    const auto payload = encode(Refusal{reason, text});
    (void)channel.try_send({.type = kTypeRefused, .payload = payload});
    channel.shutdown_send();
    ReceiveOptions no_fds;
    no_fds.max_fds = 0;
    Message discard;
    for (int i = 0; i < 4 && channel.try_receive(discard, no_fds); ++i) {
    }
  } catch (const std::exception&) {
    // The peer is gone or not reading: it learns of the refusal from the closed channel.
  }
}

}  // namespace

std::string_view to_string(ServeResult result) noexcept {
  switch (result) {
    case ServeResult::idle: return "idle";
    case ServeResult::handed_over: return "handed over";
    case ServeResult::failed: return "failed";
    case ServeResult::refused: return "refused";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------
// Holder.

HandoffServer HandoffServer::listen(const Endpoint& control, HandoffServerOptions options) {
  const std::string what = control.to_string();
  const bool path = control.kind == Endpoint::Kind::unix_path;
  if (!path && control.kind != Endpoint::Kind::unix_abstract) {
    throw Error(ErrorKind::invalid_input, 0, "HandoffServer::listen(" + what + ")",
                "the control address is a unix socket (unix:/dir/name or unix:@name)");
  }
  if (path && options.require_private_directory) require_private_directory(control.path);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (control.path.empty() || control.path.size() > sizeof(sun.sun_path) - 1) {
    throw Error(ErrorKind::invalid_input, 0, "HandoffServer::listen(" + what + ")",
                "path empty or longer than 107 bytes");
  }
  std::memcpy(sun.sun_path + (path ? 0 : 1), control.path.data(), control.path.size());
  const auto length =
      static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + control.path.size() + 1);
  auto* address = reinterpret_cast<const sockaddr*>(&sun);

  HandoffServer server;
  server.options_ = std::move(options);
  server.endpoint_ = control;
  server.control_ = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!server.control_.valid()) sys::throw_errno("socket(AF_UNIX, SOCK_SEQPACKET) for " + what);
  // Owner-only from the moment the file exists.
  int err = path ? sys::bind_unix_with_mode(server.control_.get(), address, length, 0600)
                 : (::bind(server.control_.get(), address, length) == 0 ? 0 : errno);
  if (err == EADDRINUSE && path) {
    // A file left by a generation that died: replace it only if nobody answers on it, so a
    // live holder is never cut off from its successors.
    err = sys::replace_stale_unix_socket(server.control_.get(), control.path, address, length,
                                         0600);
  }
  if (err != 0) sys::throw_errno("bind(" + what + ")", err);
  if (path) {
    server.control_path_ = control.path;
    server.control_inode_ = path_inode(control.path);
  }
  if (::listen(server.control_.get(), 16) != 0) sys::throw_errno("listen(" + what + ")");
  return server;
}

HandoffServer HandoffServer::adopt(Fd control_listener, HandoffServerOptions options) {
  const SocketIdentity id = identify(control_listener.borrow());
  if (!id.is_socket || id.family != AF_UNIX || id.type != SOCK_SEQPACKET || !id.listening) {
    throw Error(ErrorKind::invalid_input, 0, "HandoffServer::adopt",
                "expected a listening unix seqpacket socket, got " + id.describe());
  }
  HandoffServer server;
  server.options_ = std::move(options);
  server.endpoint_ = local_endpoint(control_listener.borrow());
  // R14: O_NONBLOCK is shared with the previous generation's copy, which uses it too.
  set_nonblocking(control_listener.borrow(), true);
  // A unix socket's clients see the credentials of whoever last called listen() on it
  // (SO_PEERCRED and SO_PEERPIDFD are copied from the listener at connect time), not of the
  // process that accepts. Listening again makes the next taker see, and check, this
  // generation instead of a predecessor that may be gone.
  if (::listen(control_listener.get(), 16) != 0) {
    sys::throw_errno("listen(adopted handoff control " + local_endpoint(control_listener.borrow()).to_string() + ")");
  }
  server.control_ = std::move(control_listener);
  if (server.endpoint_.kind == Endpoint::Kind::unix_path) {
    server.control_path_ = server.endpoint_.path;
    server.control_inode_ = path_inode(server.control_path_);
  }
  return server;
}

HandoffServer::HandoffServer(HandoffServer&& other) noexcept
    : control_(std::move(other.control_)),
      endpoint_(std::move(other.endpoint_)),
      options_(std::move(other.options_)),
      entries_(std::move(other.entries_)),
      control_path_(std::move(other.control_path_)),
      control_inode_(std::exchange(other.control_inode_, 0)),
      handed_over_(other.handed_over_) {
  other.entries_.clear();
}

HandoffServer& HandoffServer::operator=(HandoffServer&& other) noexcept {
  if (this != &other) {
    remove_paths();
    control_ = std::move(other.control_);
    endpoint_ = std::move(other.endpoint_);
    options_ = std::move(other.options_);
    entries_ = std::move(other.entries_);
    other.entries_.clear();
    control_path_ = std::move(other.control_path_);
    control_inode_ = std::exchange(other.control_inode_, 0);
    handed_over_ = other.handed_over_;
  }
  return *this;
}

HandoffServer::~HandoffServer() { remove_paths(); }

void HandoffServer::remove_paths() noexcept {
  // After a handoff the successor listens on these very files: removing them would make
  // every later connect by path fail although the socket still accepts.
  if (handed_over_ || !options_.remove_paths_on_exit) return;
  auto remove_if_ours = [](const std::string& path, std::uint64_t inode) {
    if (!path.empty() && inode != 0 && path_inode(path) == inode) ::unlink(path.c_str());
  };
  if (control_.valid()) remove_if_ours(control_path_, control_inode_);
  for (const auto& entry : entries_) remove_if_ours(entry.path, entry.path_inode);
  control_inode_ = 0;
  entries_.clear();
}

void HandoffServer::add(std::string name, BorrowedFd listener) {
  const std::string op = "HandoffServer::add(" + name + ")";
  if (!systemd::is_valid_name(name)) {
    throw Error(ErrorKind::invalid_input, 0, op,
                "name must be 1-255 printable ASCII characters without ':' (LISTEN_FDNAMES)");
  }
  for (const auto& entry : entries_) {
    if (entry.meta.name == name) throw Error(ErrorKind::invalid_input, 0, op, "name already registered");
  }
  if (entries_.size() >= kMaxListeners) throw Error(ErrorKind::invalid_input, 0, op, "too many listeners");
  const SocketIdentity id = identify(listener);
  if (!id.is_socket) throw Error(ErrorKind::invalid_input, 0, op, "not a socket");
  if ((id.type == SOCK_STREAM || id.type == SOCK_SEQPACKET) && !id.listening) {
    throw Error(ErrorKind::invalid_input, 0, op, "a " + id.describe() + " that is not listening");
  }
  Entry entry;
  entry.fd = listener;
  entry.meta.name = std::move(name);
  entry.meta.family = id.family;
  entry.meta.type = id.type;
  entry.meta.protocol = id.protocol;
  entry.meta.cookie = id.cookie;
  Endpoint local = local_endpoint(listener);
  entry.meta.endpoint = local.to_string().substr(0, kMaxEndpointLength);
  if (local.kind == Endpoint::Kind::unix_path) {
    entry.path = local.path;
    entry.path_inode = path_inode(local.path);
  }
  if (auto why = meta_mismatch(entry.meta, id)) throw Error(ErrorKind::invalid_input, 0, op, *why);
  entries_.push_back(std::move(entry));
}

void HandoffServer::refuse(Channel& channel, Reason reason, const std::string& text) noexcept {
  send_refusal(channel, reason, text);
}

ServeOutcome HandoffServer::serve(std::chrono::milliseconds wait) {
  if (handed_over_) {
    throw Error(ErrorKind::invalid_input, 0, "HandoffServer::serve",
                "the listeners were handed over already; the successor serves the next handoff");
  }
  const auto deadline = sys::deadline_after(wait);
  for (;;) {
    const int fd = sys::retry_eintr([&] {
      return sys::seam().accept4(control_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    });
    if (fd >= 0) {
      Channel taker{Fd(fd)};
      pid_t pid = 0;
      if (auto why = check_peer(taker, options_.taker, "taker", pid)) {
        refuse(taker, Reason::identity, *why);
        ServeOutcome outcome;
        outcome.result = ServeResult::refused;
        outcome.detail = *why;
        outcome.taker_pid = pid;
        return outcome;
      }
      return serve_taker(taker, pid);
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED) {
      sys::throw_errno("accept4(handoff control " + endpoint_.to_string() + ")");
    }
    if (!sys::wait_ready(control_.get(), POLLIN, deadline)) return {};
  }
}

ServeOutcome HandoffServer::serve_taker(Channel& taker, pid_t taker_pid) {
  const auto started = Clock::now();
  ServeOutcome outcome;
  outcome.taker_pid = taker_pid;
  const std::string who = "taker pid " + std::to_string(taker_pid);
  auto finish = [&](ServeResult result, std::string detail) {
    outcome.result = result;
    outcome.detail = std::move(detail);
    outcome.duration = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - started);
    return outcome;
  };
  // The taker never sends descriptors (R16): refused by the kernel where it can, and by
  // the receive options everywhere.
  taker.refuse_descriptors();
  ReceiveOptions no_fds;
  no_fds.max_fds = 0;

  // Waits for the taker's next message while turning away anyone else who connects: one
  // upgrade at a time, and a second taker learns why at once instead of timing out.
  Message message;
  std::string failure;
  auto next_message = [&](sys::Deadline deadline) -> Wait {
    for (;;) {
      try {
        if (taker.try_receive(message, no_fds)) return Wait::message;
      } catch (const Error& e) {
        failure = who + ": " + e.what();
        // A taker that hangs up with our listeners unread resets the connection, and the
        // reset is reported before its last message (receive_pending explains why).
        try {
          if (e.code() == ECONNRESET && taker.try_receive(message, no_fds)) return Wait::message;
        } catch (const Error&) {
        }
        return Wait::failed;
      }
      std::array<pollfd, 2> fds{pollfd{taker.native_handle().get(), POLLIN, 0},
                                pollfd{control_.get(), POLLIN, 0}};
      const int n = sys::wait_any(fds, deadline);
      if (n == 0) return Wait::timed_out;
      if ((fds[1].revents & POLLIN) != 0) {
        const int other = sys::retry_eintr([&] {
          return sys::seam().accept4(control_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        });
        if (other >= 0) {
          Channel second{Fd(other)};
          refuse(second, Reason::busy,
                 "a handoff to pid " + std::to_string(taker_pid) +
                     " is in progress; one upgrade at a time");
          ++outcome.concurrent_refused;
        }
      }
    }
  };

  // 1. Hello.
  switch (next_message(sys::deadline_after(options_.exchange_timeout))) {
    case Wait::timed_out: return finish(ServeResult::failed, who + " sent no hello in time");
    case Wait::failed: return finish(ServeResult::failed, failure);
    case Wait::message: break;
  }
  Hello hello;
  if (message.type != kTypeHello) {
    const std::string why = "expected hello, got message type " + std::to_string(message.type);
    refuse(taker, Reason::protocol, why);
    return finish(ServeResult::failed, who + ": " + why);
  }
  if (auto decoded = decode(message.payload, hello); !decoded.ok) {
    refuse(taker, Reason::protocol, decoded.error);
    return finish(ServeResult::failed, who + ": " + decoded.error);
  }
  if (hello.version != kProtocolVersion) {
    const std::string why = "protocol version " + std::to_string(hello.version) +
                            " not spoken (this holder speaks " +
                            std::to_string(kProtocolVersion) + ")";
    refuse(taker, Reason::version, why);
    return finish(ServeResult::refused, who + ": " + why);
  }

  // 2. Every listener, in batches the kernel accepts (R8), each with its metadata.
  std::vector<BorrowedFd> fds;
  std::vector<std::vector<std::byte>> metas;
  for (const auto& entry : entries_) {
    fds.push_back(entry.fd);
    metas.push_back(encode_meta(entry.meta));
  }
  if (options_.hand_over_control) {
    ListenerMeta control;
    const SocketIdentity id = identify(control_.borrow());
    control.name = "sockshare-handoff";
    control.endpoint = endpoint_.to_string().substr(0, kMaxEndpointLength);
    control.family = id.family;
    control.type = id.type;
    control.protocol = id.protocol;
    control.cookie = id.cookie;
    control.control = true;
    fds.push_back(control_.borrow());
    metas.push_back(encode_meta(control));
  }
  std::vector<std::span<const std::byte>> meta_spans(metas.begin(), metas.end());
  const auto total = static_cast<std::uint32_t>(fds.size());
  const auto send_deadline = sys::deadline_after(options_.exchange_timeout);
  std::size_t first = 0;
  do {
    const std::size_t count = std::min(wire::kMaxFds, fds.size() - first);
    const auto payload = encode(Batch{static_cast<std::uint32_t>(first), total});
    Outgoing out;
    out.type = kTypeListeners;
    out.payload = payload;
    out.fds = std::span<const BorrowedFd>(fds).subspan(first, count);
    if (count > 0) out.fd_meta = std::span<const std::span<const std::byte>>(meta_spans).subspan(first, count);
    try {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(send_deadline - Clock::now());
      taker.send(out, std::max(left, std::chrono::milliseconds(0)));
    } catch (const Error& e) {
      // A taker that gave up early may have said why before hanging up.
      std::string reason;
      try {
        if (taker.try_receive(message, no_fds) && message.type == kTypeAbort) {
          Refusal refusal;
          if (decode(message.payload, refusal).ok) reason = " (it abandoned the handoff: " + refusal.text + ")";
        }
      } catch (const Error&) {
      }
      return finish(ServeResult::failed, who + ": sending listeners: " + e.what() + reason);
    }
    first += count;
    outcome.descriptors_sent = first;
  } while (first < fds.size());

  // 3. The acknowledgement. Until it arrives the taker may still fail (R9: a successful
  // send does not mean the descriptors arrived), so this generation keeps accepting.
  switch (next_message(sys::deadline_after(options_.exchange_timeout))) {
    case Wait::timed_out:
      return finish(ServeResult::failed, who + " did not acknowledge the listeners in time");
    case Wait::failed: return finish(ServeResult::failed, failure);
    case Wait::message: break;
  }
  if (message.type == kTypeAbort) {
    Refusal refusal;
    auto decoded = decode(message.payload, refusal);
    return finish(ServeResult::failed,
                  who + " abandoned the handoff: " + (decoded.ok ? refusal.text : decoded.error));
  }
  Ack ack;
  if (message.type != kTypeAck) {
    const std::string why = "expected ack, got message type " + std::to_string(message.type);
    refuse(taker, Reason::protocol, why);
    return finish(ServeResult::failed, who + ": " + why);
  }
  if (auto decoded = decode(message.payload, ack); !decoded.ok || ack.count != total) {
    const std::string why = decoded.ok ? "acknowledged " + std::to_string(ack.count) + " of " +
                                             std::to_string(total) + " descriptors"
                                       : decoded.error;
    refuse(taker, Reason::protocol, why);
    return finish(ServeResult::failed, who + ": " + why);
  }

  // 4. Handed over: stop accepting, then say so.
  handed_over_ = true;
  std::exception_ptr callback_error;
  if (options_.on_handed_over) {
    try {
      options_.on_handed_over();
    } catch (...) {
      callback_error = std::current_exception();
    }
  }
  try {
    (void)taker.try_send({.type = kTypeReleased});
  } catch (const Error&) {
    // The taker owns the listeners now whether or not it hears this.
  }
  if (callback_error) std::rethrow_exception(callback_error);
  return finish(ServeResult::handed_over, {});
}

// ---------------------------------------------------------------------------------------
// Taker.

HandoffClient HandoffClient::connect(const Endpoint& control, TakeOptions options) {
  HandoffClient client;
  client.options_ = options;
  client.channel_ = Channel::connect(control, options.timeout);
  pid_t pid = 0;
  if (auto why = check_peer(client.channel_, options.holder, "holder", pid)) {
    client.finished_ = true;
    throw Error(ErrorKind::refused, 0, "handoff from " + control.to_string(), *why);
  }
  client.holder_pid_ = pid;
  const auto hello = encode(Hello{});
  try {
    client.channel_.send({.type = kTypeHello, .payload = hello}, options.timeout);
  } catch (const Error& e) {
    // A holder that refuses (busy, identity) may answer and hang up before our hello is
    // out; its refusal is still queued for us, and receive() reports it.
    if (e.kind() != ErrorKind::peer_gone) throw;
  }
  return client;
}

HandoffClient::~HandoffClient() {
  if (!finished_) abort("the taker gave up before acknowledging");
}

void HandoffClient::abort(std::string_view reason) noexcept {
  if (finished_ || !channel_.valid()) return;
  finished_ = true;
  try {
    const auto payload = encode(Refusal{Reason::rejected, std::string(reason)});
    (void)channel_.try_send({.type = kTypeAbort, .payload = payload});
  } catch (const std::exception&) {
    // The holder learns from the closed channel instead.
  }
  channel_ = Channel();
}

Takeover HandoffClient::receive() {
  const std::string op = "handoff from holder pid " + std::to_string(holder_pid_);
  if (finished_ || received_all_) {
    throw Error(ErrorKind::invalid_input, 0, op, "receive() runs once per handoff");
  }
  auto reject = [&](std::string why) {
    abort(why);
    throw Error(ErrorKind::protocol, 0, op, why);
  };
  // No per-descriptor check in the channel: each descriptor is identified once below and
  // held against its metadata, which is stricter than any Expect (R15), and unix listeners
  // and the control listener legitimately travel (R11 does not apply to listeners we asked
  // for from a peer we checked).
  ReceiveOptions options;
  options.expect = Expect::anything;
  options.allow_unix_sockets = true;
  Takeover takeover;
  takeover.holder_pid = holder_pid_;
  std::set<std::string> names;
  std::uint32_t total = 0;
  bool have_total = false;
  Message message;
  while (!have_total || received_ < total) {
    try {
      receive_pending(channel_, message, options, options_.timeout);
    } catch (const ChannelError& e) {
      reject(e.what());
    } catch (const Error&) {
      finished_ = true;
      throw;
    }
    if (message.type == kTypeRefused) {
      Refusal refusal;
      auto decoded = decode(message.payload, refusal);
      finished_ = true;
      throw Error(ErrorKind::refused, 0, op,
                  decoded.ok ? std::string(to_string(refusal.reason)) + ": " + refusal.text
                             : "refused with a malformed reason: " + decoded.error);
    }
    if (message.type != kTypeListeners) {
      reject("expected listeners, got message type " + std::to_string(message.type));
    }
    Batch batch;
    if (auto decoded = decode(message.payload, batch); !decoded.ok) reject(decoded.error);
    if (have_total && batch.total != total) reject("the set's size changed between batches");
    total = batch.total;
    have_total = true;
    if (batch.first_index != received_) {
      reject("batch starts at " + std::to_string(batch.first_index) + ", expected " +
             std::to_string(received_));
    }
    if (batch.first_index + message.fds.size() > total) reject("more descriptors than announced");
    if (message.fds.empty() && total != 0) reject("a batch without descriptors");
    if (message.fd_meta.size() != message.fds.size()) reject("descriptors without metadata");
    for (std::size_t i = 0; i < message.fds.size(); ++i) {
      ListenerMeta meta;
      if (auto decoded = decode_meta(message.fd_meta[i], meta); !decoded.ok) reject(decoded.error);
      const SocketIdentity id = identify(message.fds[i].borrow());
      if (auto why = meta_mismatch(meta, id)) reject("descriptor " + describe_meta(meta) + ": " + *why);
      if (!names.insert(meta.name).second) reject("listener name \"" + meta.name + "\" appears twice");
      if (meta.control) {
        if (takeover.control.valid()) reject("two control listeners");
        takeover.control = std::move(message.fds[i]);
        continue;
      }
      takeover.listeners.push_back({std::move(message.fds[i]), std::move(meta), id});
    }
    received_ += static_cast<std::uint32_t>(message.fds.size());
  }
  received_all_ = true;
  return takeover;
}

bool HandoffClient::commit() {
  const std::string op = "handoff from holder pid " + std::to_string(holder_pid_);
  if (!received_all_ || finished_) {
    throw Error(ErrorKind::invalid_input, 0, op, "commit() needs a complete receive() first");
  }
  finished_ = true;
  const auto payload = encode(Ack{received_});
  try {
    channel_.send({.type = kTypeAck, .payload = payload}, options_.timeout);
  } catch (const Error& e) {
    // A holder that died before our ack accepts nothing any more: the listeners are ours.
    if (e.kind() != ErrorKind::peer_gone) throw;
    channel_ = Channel();
    return false;
  }
  // The holder confirms it stopped accepting. If it dies or stalls instead, the listeners
  // are still ours: report it, nothing more.
  bool released = false;
  try {
    Message message;
    ReceiveOptions no_fds;
    no_fds.max_fds = 0;
    channel_.receive(message, no_fds, options_.timeout);
    released = message.type == kTypeReleased;
  } catch (const Error&) {
    released = false;
  }
  channel_ = Channel();
  return released;
}

Takeover take_listeners(const Endpoint& control, TakeOptions options) {
  HandoffClient client = HandoffClient::connect(control, options);
  Takeover takeover = client.receive();
  takeover.released = client.commit();
  return takeover;
}

}  // namespace sockshare::handoff
