// The target side of duplicate/redeem: WSASocket(FROM_PROTOCOL_INFO) on Linux.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

#include "linux/pidfd.hpp"
#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/grant.hpp"

namespace sockshare {
namespace {

namespace gp = grant_protocol;
using Clock = std::chrono::steady_clock;

std::uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000U +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

std::chrono::milliseconds left(Clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return ms.count() < 0 ? std::chrono::milliseconds(0) : ms;
}

std::uint64_t get_le(const std::byte* in, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t{std::to_integer<std::uint8_t>(in[i])} << (8 * i);
  return v;
}

void put_le(std::byte* out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = std::byte{static_cast<std::uint8_t>(v >> (8 * i))};
}

std::span<const std::byte> text_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// R15/R20: the descriptor must be the very socket the info describes. The cookie is unique
// for the boot, so a reused descriptor number or a swapped socket cannot pass.
std::optional<std::string> wrong_socket(BorrowedFd fd, const SocketInfo& info) {
  const SocketIdentity id = identify(fd);
  if (!id.is_socket) return "not a socket";
  if (id.family != info.family || id.type != info.type || id.protocol != info.protocol) {
    return "got " + id.describe() + ", the info describes another kind of socket";
  }
  if (info.cookie != 0 && id.cookie != info.cookie) return "socket cookie differs from the grant's";
  return std::nullopt;
}

bool same_process(const pidfd::Identity& who, std::uint64_t inode, std::int32_t pid,
                  std::uint32_t uid) {
  if (inode != 0 && who.inode != 0) return who.inode == inode;
  return who.pid == pid && who.uid == uid;
}

std::string redeem_op(const SocketInfo& info) {
  return "redeem(" + info.describe() + ")";
}

std::string source_exited(const SocketInfo& info) {
  return "the source process (pid " + std::to_string(info.source_pid) + ") has exited";
}

// Checks every redemption path makes before anything else. The source refuses these too;
// checking first gives the target a precise message and never shows the token (or, for a
// direct redemption, touches the source) when the grant cannot be ours.
void check_target_and_expiry(const SocketInfo& info) {
  const pidfd::Identity me = pidfd::self();
  if (!same_process(me, info.target_inode, info.target_pid, info.target_uid)) {
    throw Error(ErrorKind::refused, 0, redeem_op(info),
                "this grant is bound to pid " + std::to_string(info.target_pid) +
                    ", not to this process (pid " + std::to_string(me.pid) + ") (S1/R17)");
  }
  if (info.expires_ns <= now_ns()) {
    throw Error(ErrorKind::refused, 0, redeem_op(info), "the grant has expired");
  }
}

std::optional<std::uint64_t> cookie_of(int fd) {
  std::uint64_t cookie = 0;
  socklen_t len = sizeof cookie;
  if (::getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) != 0 || len != sizeof cookie) {
    return std::nullopt;
  }
  return cookie;
}

// Why a direct redemption could not complete; the caller falls back to the channel or
// throws refused with it.
struct DirectRefusal {
  int code = 0;
  std::string why;
};

}  // namespace

// ---- the source pidfd cache ---------------------------------------------------------------

class DirectSourceCache::Impl {
 public:
  explicit Impl(std::size_t capacity) : capacity_(std::max<std::size_t>(1, capacity)) {}

  // The last socket whose kind was verified through a source. A cookie names one socket for
  // the boot and a socket's family, type and protocol never change, so once verified, a
  // later redemption of the same socket needs only its cookie.
  struct Verified {
    std::uint64_t cookie = 0;
    std::int32_t family = 0;
    std::int32_t type = 0;
    std::int32_t protocol = 0;
  };
  struct Lookup {
    std::shared_ptr<const Fd> pidfd;
    Verified verified;
  };

  // The pidfd of the source named in `info`, opened and identity-checked (R17) on first use.
  // Throws peer_gone when the source has exited (or its pid now names another process).
  Lookup find_or_open(const SocketInfo& info) {
    {
      std::lock_guard lock(mutex_);
      if (Entry* entry = find(info)) {
        entry->used = ++clock_;
        return {entry->pidfd, entry->verified};
      }
    }
    std::optional<Fd> opened = pidfd::try_open(info.source_pid);
    if (!opened) throw Error(ErrorKind::peer_gone, ESRCH, redeem_op(info), source_exited(info));
    pidfd::Identity who;
    try {
      who = pidfd::identify(opened->borrow());
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::refused) throw;
      throw Error(ErrorKind::peer_gone, ESRCH, redeem_op(info), source_exited(info));
    }
    // R17: the pid may have been reused since the info was made; only the pidfs inode (or,
    // before pidfs, pid and uid) says this is the process that granted it.
    if (!same_process(who, info.source_inode, info.source_pid, info.source_uid)) {
      throw Error(ErrorKind::peer_gone, ESRCH, redeem_op(info),
                  source_exited(info) + " (pid " + std::to_string(info.source_pid) +
                      " now names another process, R17)");
    }
    auto shared = std::make_shared<const Fd>(std::move(*opened));
    std::lock_guard lock(mutex_);
    if (Entry* entry = find(info)) {  // another thread got there first
      entry->used = ++clock_;
      return {entry->pidfd, entry->verified};
    }
    if (entries_.size() >= capacity_) evict_one();
    entries_.push_back({who, shared, {}, ++clock_});
    return {shared, {}};
  }

  void remember(const SocketInfo& info, const Verified& verified) {
    std::lock_guard lock(mutex_);
    if (Entry* entry = find(info)) entry->verified = verified;
  }

  void forget(const SocketInfo& info) {
    std::lock_guard lock(mutex_);
    std::erase_if(entries_, [&](const Entry& e) { return matches(e, info); });
  }

  void clear() {
    std::lock_guard lock(mutex_);
    entries_.clear();
  }

  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return entries_.size();
  }

 private:
  struct Entry {
    pidfd::Identity who;
    std::shared_ptr<const Fd> pidfd;
    Verified verified;
    std::uint64_t used = 0;
  };

  static bool matches(const Entry& e, const SocketInfo& info) {
    return e.who.pid == info.source_pid &&
           same_process(e.who, info.source_inode, info.source_pid, info.source_uid);
  }

  Entry* find(const SocketInfo& info) {
    for (auto& e : entries_) {
      if (matches(e, info)) return &e;
    }
    return nullptr;
  }

  // Sources that have exited go first (a pidfd polls readable at exit), else the least
  // recently used. A redemption still using an evicted pidfd keeps it alive until it ends.
  void evict_one() {
    auto victim = std::find_if(entries_.begin(), entries_.end(),
                               [](const Entry& e) { return pidfd::exited(e.pidfd->borrow()); });
    if (victim == entries_.end()) {
      victim = std::min_element(entries_.begin(), entries_.end(),
                                [](const Entry& a, const Entry& b) { return a.used < b.used; });
    }
    entries_.erase(victim);
  }

  const std::size_t capacity_;
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;
  std::uint64_t clock_ = 0;
};

DirectSourceCache::DirectSourceCache(std::size_t capacity)
    : impl_(std::make_unique<Impl>(capacity)) {}

DirectSourceCache::~DirectSourceCache() = default;

DirectSourceCache& DirectSourceCache::process() {
  static DirectSourceCache cache;
  return cache;
}

void DirectSourceCache::clear() {
  impl_->clear();
}

std::size_t DirectSourceCache::size() const {
  return impl_->size();
}

namespace {

// The direct redemption: no message to the source. Returns the descriptor, or the reason it
// could not be taken (the caller falls back or throws). Throws itself only what a fallback
// could not cure: the source has exited.
std::variant<Fd, DirectRefusal> redeem_direct(const SocketInfo& info,
                                              DirectSourceCache::Impl& cache) {
  using Verified = DirectSourceCache::Impl::Verified;
  if ((info.flags & SocketInfo::kFlagDirect) == 0 || info.source_fd < 0 || info.cookie == 0) {
    return DirectRefusal{0, "the source does not offer direct redemption for this grant"};
  }
  const auto source = cache.find_or_open(info);
  pidfd::GetFdResult got = pidfd::get_fd(source.pidfd->borrow(), info.source_fd);
  if (!got.fd.valid()) {
    if (got.error == ESRCH) {
      cache.forget(info);
      throw Error(ErrorKind::peer_gone, ESRCH, redeem_op(info), source_exited(info));
    }
    std::string why = "pidfd_getfd(source pid " + std::to_string(info.source_pid) + ", fd " +
                      std::to_string(info.source_fd) + "): " + std::strerror(got.error);
    if (got.error == EBADF) why += " (the grant was revoked or expired)";
    if (got.error == EPERM || got.error == EACCES) {
      why += " (no ptrace rights over the source: other uid, non-dumpable, Yama, seccomp; R20)";
    }
    return DirectRefusal{got.error, std::move(why)};
  }
  // R20: the number is only a name; after a revoke or expiry it may name another descriptor.
  const std::optional<std::uint64_t> cookie = cookie_of(got.fd.get());
  if (!cookie || *cookie != info.cookie) {
    return DirectRefusal{ESTALE, "descriptor " + std::to_string(info.source_fd) +
                                     " of the source is no longer the granted socket (socket "
                                     "cookie differs: revoked or expired, number reused; R20)"};
  }
  const Verified& known = source.verified;
  if (known.cookie != info.cookie) {
    // The cookie already proved it is a socket: three getsockopt calls give its kind.
    const int fd = got.fd.get();
    SocketIdentity id;
    id.is_socket = true;
    id.family = sys::get_int_option(fd, SOL_SOCKET, SO_DOMAIN).value_or(-1);
    id.type = sys::get_int_option(fd, SOL_SOCKET, SO_TYPE).value_or(-1);
    id.protocol = sys::get_int_option(fd, SOL_SOCKET, SO_PROTOCOL).value_or(-1);
    cache.remember(info, {*cookie, id.family, id.type, id.protocol});
    if (id.family != info.family || id.type != info.type || id.protocol != info.protocol) {
      return DirectRefusal{
          EPROTOTYPE, "got " + id.describe() + ", the info describes another kind of socket (R15)"};
    }
  } else if (known.family != info.family || known.type != info.type ||
             known.protocol != info.protocol) {
    return DirectRefusal{EPROTOTYPE, "the info describes another kind of socket (R15)"};
  }
  return std::move(got.fd);
}

Fd redeem_channel(const SocketInfo& info, const RedeemOptions& options);

}  // namespace

Fd redeem(const SocketInfo& info, const RedeemOptions& options) {
  check_target_and_expiry(info);
  if (!options.direct) return redeem_channel(info, options);
  DirectSourceCache& sources =
      options.sources != nullptr ? *options.sources : DirectSourceCache::process();
  auto outcome = redeem_direct(info, *sources.impl_);
  if (auto* fd = std::get_if<Fd>(&outcome)) return std::move(*fd);
  auto& refusal = std::get<DirectRefusal>(outcome);
  if (!options.direct_fallback) {
    throw Error(ErrorKind::refused, refusal.code, redeem_op(info),
                "direct redemption failed: " + refusal.why);
  }
  return redeem_channel(info, options);
}

namespace {

Fd redeem_channel(const SocketInfo& info, const RedeemOptions& options) {
  const std::string op = redeem_op(info);
  const auto deadline = Clock::now() + options.timeout;

  Channel channel;
  try {
    channel = Channel::connect(info.grant_endpoint(), left(deadline));
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::timed_out) throw;
    bool source_alive = false;
    try {
      if (auto source = pidfd::try_open(info.source_pid)) {
        source_alive = same_process(pidfd::identify(source->borrow()), info.source_inode,
                                    info.source_pid, info.source_uid);
      }
    } catch (const Error&) {
    }
    throw Error(ErrorKind::peer_gone, e.code(), op,
                source_alive
                    ? "the source process no longer serves grants at " + info.endpoint_text()
                    : source_exited(info));
  }

  // R18: anyone may bind an abstract name. Present the token only to the source itself.
  Fd source_pidfd;
  pidfd::Identity server;
  try {
    if (auto peer = channel.peer_pidfd()) {
      server = pidfd::identify(peer->borrow());
      source_pidfd = std::move(*peer);
    } else {
      const PeerCredentials cred = channel.peer_credentials();
      server.pid = cred.pid;
      server.uid = cred.uid;
    }
  } catch (const Error& e) {
    throw Error(ErrorKind::peer_gone, e.code(), op, "the process serving the endpoint exited");
  }
  if (!same_process(server, info.source_inode, info.source_pid, info.source_uid)) {
    throw Error(ErrorKind::refused, 0, op,
                "the grant endpoint " + info.endpoint_text() + " is served by pid " +
                    std::to_string(server.pid) + ", not by the source pid " +
                    std::to_string(info.source_pid) + " (squatter? R18)");
  }

  const bool fast =
      options.fast_path && (info.flags & SocketInfo::kFlagFastPath) != 0 && source_pidfd.valid();
  std::byte request[20];
  std::memcpy(request, info.token.data(), 16);
  put_le(request + 16, fast ? gp::kRedeemFastPath : 0U, 4);
  channel.send({.type = gp::kRedeem, .payload = request}, left(deadline));

  const ReceiveOptions receive_options{
      .expect = Expect::any_socket, .allow_unix_sockets = info.family == AF_UNIX, .max_fds = 1};
  bool asked_fallback = false;
  Message reply;
  for (;;) {
    try {
      channel.receive(reply, receive_options, left(deadline));
    } catch (const ChannelError& e) {
      // The channel already closed what arrived; tell the source so it can report it.
      (void)channel.try_send({.type = gp::kReject, .payload = text_bytes(e.what())});
      throw;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::peer_gone) throw;
      throw Error(ErrorKind::peer_gone, 0, op, "the source closed the connection before answering");
    }
    Fd socket;
    if (reply.type == gp::kRefused) {
      throw Error(ErrorKind::refused, 0, op,
                  "the source refused: " + std::string(reply.payload_text()));
    } else if (reply.type == gp::kNumber && fast && !asked_fallback && reply.payload.size() == 12 &&
               reply.fds.empty()) {
      const auto number = static_cast<std::int32_t>(get_le(reply.payload.data(), 4));
      pidfd::GetFdResult got = pidfd::get_fd(source_pidfd.borrow(), number);
      int why = got.error;
      if (got.fd.valid() && wrong_socket(got.fd.borrow(), info)) {
        got.fd.reset();
        why = ESTALE;  // not the granted socket: take the SCM_RIGHTS copy instead
      }
      if (!got.fd.valid()) {
        std::byte err[4];
        put_le(err, static_cast<std::uint32_t>(why), 4);
        asked_fallback = true;
        channel.send({.type = gp::kFallback, .payload = err}, left(deadline));
        continue;
      }
      socket = std::move(got.fd);
    } else if (reply.type == gp::kSocket && reply.fds.size() == 1) {
      socket = std::move(reply.fds[0]);
      if (auto why = wrong_socket(socket.borrow(), info)) {
        (void)channel.try_send({.type = gp::kReject, .payload = text_bytes(*why)});
        throw Error(ErrorKind::protocol, 0, op, *why);
      }
    } else {
      throw Error(ErrorKind::protocol, 0, op,
                  "unexpected reply type " + std::to_string(reply.type) + " with " +
                      std::to_string(reply.fds.size()) + " descriptors");
    }
    // A redemption counts only once the source has our ack; for a move the source closes its
    // copy on it, so a lost ack must not leave two owners who each think they hold it alone.
    channel.send({.type = gp::kAck}, left(deadline));
    return socket;
  }
}

}  // namespace

SocketInfo inherited_info(std::string_view name) {
  const std::string var(name);
  if (const char* text = std::getenv(var.c_str())) return SocketInfo::parse(text);
  const std::string fd_var = var + "_FD";
  const char* fd_text = std::getenv(fd_var.c_str());
  if (fd_text == nullptr) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + var + ")",
                "neither " + var + " nor " + fd_var + " is set");
  }
  char* end = nullptr;
  const long number = std::strtol(fd_text, &end, 10);
  if (end == fd_text || *end != '\0' || number < 0 || number > 1 << 20) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + fd_var + ")",
                "not a descriptor number");
  }
  // spawn_with_socket never names a standard stream, and owning one here would close it.
  if (number < 3) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + fd_var + "=" + fd_text + ")",
                "descriptors 0-2 are standard streams, not an info pipe");
  }
  // Close-on-exec before anything else: until then another thread's fork + exec would hand
  // the info to a program it was not meant for.
  if (::fcntl(static_cast<int>(number), F_SETFD, FD_CLOEXEC) != 0) {
    const int err = errno;
    sys::throw_errno("inherited_info(" + fd_var + "=" + fd_text + "): fcntl(F_SETFD)", err);
  }
  Fd fd(static_cast<int>(number));
  // Whatever we read, the variable must not point at a closed (and later reused) number.
  ::unsetenv(fd_var.c_str());
  std::string text;
  char buffer[512];
  while (text.size() < SocketInfo::kTextSize + 2 && text.find('\n') == std::string::npos) {
    const ssize_t n = sys::retry_eintr([&] { return ::read(fd.get(), buffer, sizeof buffer); });
    if (n < 0) {
      const int err = errno;
      sys::throw_errno("read(fd " + std::to_string(fd.get()) + ", socket info)", err);
    }
    if (n == 0) break;
    text.append(buffer, static_cast<std::size_t>(n));
  }
  return SocketInfo::parse(text.substr(0, text.find('\n')));
}

}  // namespace sockshare
