// The source side of duplicate/redeem: a bounded grant table served over a ChannelListener.
// One mutex guards everything; events are handled without blocking (every channel is
// non-blocking), and user callbacks run after the mutex is released.
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "linux/pidfd.hpp"
#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/grant.hpp"

namespace sockshare {
namespace {

namespace gp = grant_protocol;

// How long the listener rests after accept fails for a reason other than a connection's own
// (R21), and the background thread after process_events() throws.
constexpr std::uint64_t kRetryPauseNs = 50'000'000U;
constexpr int kRetryPauseMs = 50;

enum class Tag : std::uint64_t { listener = 1, session = 2, grant = 3, timer = 4 };
constexpr int kTagShift = 56;

std::uint64_t tag(Tag kind, std::uint64_t id) {
  return (static_cast<std::uint64_t>(kind) << kTagShift) | id;
}

std::uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000U +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

std::uint64_t ms_to_ns(std::chrono::milliseconds ms) {
  return ms.count() <= 0 ? 0 : static_cast<std::uint64_t>(ms.count()) * 1'000'000U;
}

// Compares every byte whatever the first difference, so response timing tells an attacker
// nothing about how much of a guessed token was right (R19).
bool tokens_equal(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
  if (a.size() != b.size()) return false;
  volatile std::uint8_t diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i) diff = static_cast<std::uint8_t>(diff | (a[i] ^ b[i]));
  return diff == 0;
}

std::span<const std::byte> text_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

void put_le(std::byte* out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = std::byte{static_cast<std::uint8_t>(v >> (8 * i))};
}

std::uint64_t get_le(const std::byte* in, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t{std::to_integer<std::uint8_t>(in[i])} << (8 * i);
  return v;
}

std::string random_hex(std::size_t bytes) {
  std::vector<std::uint8_t> raw(bytes);
  std::size_t got = 0;
  while (got < bytes) {
    const ssize_t n =
        sys::retry_eintr([&] { return ::getrandom(raw.data() + got, bytes - got, 0); });
    if (n < 0) {
      const int err = errno;
      sys::throw_errno("getrandom(" + std::to_string(bytes) + " bytes)", err);
    }
    got += static_cast<std::size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (auto b : raw) {
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

Fd dup_cloexec(BorrowedFd fd, const std::string& what) {
  const int copy = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    const int err = errno;
    sys::throw_errno("fcntl(" + what + " fd " + std::to_string(fd.get()) + ", F_DUPFD_CLOEXEC)",
                     err);
  }
  return Fd(copy);
}

}  // namespace

class GrantServer::Impl {
 public:
  explicit Impl(GrantServerOptions options);
  ~Impl();

  SocketInfo add(Fd socket, ShareMode mode, const Target& target, const GrantOptions& options);
  std::optional<Fd> revoke(const SocketInfo& info);
  std::size_t process_events();
  GrantServerStats stats() const;

  GrantServerOptions options_;
  ChannelListener listener_;
  Fd epoll_;
  Fd timer_;
  Fd wake_;  // eventfd that stops the background thread
  std::thread thread_;

 private:
  struct Grant {
    SocketInfo info;
    Fd socket;
    Fd target_pidfd;
  };
  struct Session {
    Channel channel;
    pidfd::Identity peer;
    std::uint64_t deadline_ns = 0;
    std::optional<Grant> grant;
    bool sent_number = false;
    bool sent_socket = false;
  };
  using Events = std::vector<GrantEvent>;

  void serve_loop();
  void accept_ready(Events& events);
  void session_ready(std::uint64_t id, Events& events);
  // Handles one message; returns false when the session is over.
  bool on_message(Session& session, const Message& message, Events& events);
  void end_session(std::uint64_t id, GrantOutcome outcome, std::string detail, Events& events);
  void finish(Grant grant, GrantOutcome outcome, std::string detail, Events& events);
  void remove_grant_watch(Grant& grant);
  void reap(Events& events);
  void rearm_timer();
  void set_listener_events(std::uint32_t wanted);
  void pause_listener();
  void handle(const epoll_event& ready, Events& events);
  bool send(Session& session, std::uint16_t type, std::span<const std::byte> payload,
            std::span<const BorrowedFd> fds = {});
  std::exception_ptr deliver(Events& events);

  mutable std::mutex mutex_;
  std::unordered_map<std::uint64_t, Grant> grants_;
  std::unordered_map<std::uint64_t, Session> sessions_;
  std::uint64_t next_id_ = 1;
  bool listener_paused_ = false;
  std::uint64_t listener_resume_ns_ = 0;  // after EMFILE: retry accept at this time (R21)
  GrantServerStats stats_;
};

GrantServer::Impl::Impl(GrantServerOptions options) : options_(std::move(options)) {
  Endpoint endpoint;
  if (options_.endpoint) {
    endpoint = *options_.endpoint;
  } else {
    endpoint.kind = Endpoint::Kind::unix_abstract;
    endpoint.path = "sockshare-" + std::to_string(::getpid()) + "-" + random_hex(8);
  }
  // The info stores "@name" or "/path" with at least one NUL after it.
  const std::size_t stored =
      endpoint.path.size() + (endpoint.kind == Endpoint::Kind::unix_abstract ? 1 : 0);
  if (stored + 1 > SocketInfo::kEndpointSize) {
    throw Error(ErrorKind::invalid_input, 0, "GrantServer(" + endpoint.to_string() + ")",
                "grant endpoint too long for a SocketInfo (at most 107 bytes with its '@')");
  }
  listener_ = ChannelListener::listen(endpoint, 128, 0600);
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) {
    const int err = errno;
    sys::throw_errno("epoll_create1", err);
  }
  timer_ = Fd(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!timer_.valid()) {
    const int err = errno;
    sys::throw_errno("timerfd_create(CLOCK_MONOTONIC)", err);
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = tag(Tag::listener, 0);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listener_.native_handle().get(), &ev) != 0) {
    const int err = errno;
    sys::throw_errno("epoll_ctl(ADD grant listener)", err);
  }
  ev.data.u64 = tag(Tag::timer, 0);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, timer_.get(), &ev) != 0) {
    const int err = errno;
    sys::throw_errno("epoll_ctl(ADD grant timer)", err);
  }
  if (options_.background_thread) {
    wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake_.valid()) {
      const int err = errno;
      sys::throw_errno("eventfd", err);
    }
    thread_ = std::thread([this] { serve_loop(); });
  }
}

GrantServer::Impl::~Impl() {
  if (thread_.joinable()) {
    const std::uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
    thread_.join();
  }
  Events events;
  {
    std::lock_guard lock(mutex_);
    for (auto& [id, grant] : grants_) {
      if (grant.info.mode == ShareMode::move) {
        events.push_back({grant.info, GrantOutcome::revoked, "the grant server was destroyed",
                          std::move(grant.socket)});
      }
    }
    grants_.clear();
    for (auto& [id, session] : sessions_) {
      if (session.grant && session.grant->info.mode == ShareMode::move) {
        events.push_back({session.grant->info, GrantOutcome::revoked,
                          "the grant server was destroyed during redemption",
                          std::move(session.grant->socket)});
      }
    }
    sessions_.clear();
  }
  // A destructor cannot report a callback's exception; the other events are still delivered.
  (void)deliver(events);
}

void GrantServer::Impl::serve_loop() {
  for (;;) {
    pollfd fds[2] = {{epoll_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    // Nothing but EINTR can fail for two valid descriptors, and retry_eintr absorbs that.
    if (sys::retry_eintr([&] { return ::poll(fds, 2, -1); }) < 0) continue;
    if (fds[1].revents != 0) return;
    try {
      process_events();
    } catch (const std::exception&) {
      // Per-event failures are handled inside and every collected event was delivered;
      // what reaches here is epoll_wait or the timer failing, or an on_event callback
      // throwing. Keep serving rather than take the process down from a thread nobody can
      // catch on, but not at once: whatever failed may still be readable, and retrying
      // immediately would spin. The wake descriptor still ends the wait.
      pollfd wake{wake_.get(), POLLIN, 0};
      if (sys::retry_eintr([&] { return ::poll(&wake, 1, kRetryPauseMs); }) > 0) return;
    }
  }
}

SocketInfo GrantServer::Impl::add(Fd socket, ShareMode mode, const Target& target,
                                  const GrantOptions& options) {
  const std::string op = "duplicate(fd " + std::to_string(socket.get()) + ")";
  const SocketIdentity id = identify(socket.borrow());
  if (!id.is_socket) throw Error(ErrorKind::invalid_input, ENOTSOCK, op, "not a socket");
  if (options.direct && mode != ShareMode::share) {
    throw Error(ErrorKind::invalid_input, EINVAL, op,
                "direct redemption is for share grants only: a move needs the target's ack");
  }

  Fd target_pidfd;
  if (target.pidfd_value().valid()) {
    target_pidfd = dup_cloexec(target.pidfd_value(), "target pidfd");
  } else if (auto opened = pidfd::try_open(target.pid_value())) {
    target_pidfd = std::move(*opened);
  } else {
    throw Error(ErrorKind::refused, ESRCH, op,
                "target process " + std::to_string(target.pid_value()) + " does not exist");
  }
  const pidfd::Identity who = pidfd::identify(target_pidfd.borrow());
  if (pidfd::exited(target_pidfd.borrow())) {
    throw Error(ErrorKind::refused, ESRCH, op,
                "target process " + std::to_string(who.pid) + " has exited");
  }
  const pidfd::Identity me = pidfd::self();

  SocketInfo info;
  info.mode = mode;
  info.flags = options_.offer_fast_path ? SocketInfo::kFlagFastPath : 0;
  info.family = id.family;
  info.type = id.type;
  info.protocol = id.protocol;
  info.cookie = id.cookie;
  // Without a cookie the target could not tell the granted socket from whatever reuses the
  // number after expiry or revoke, so direct redemption is offered only with one (R20).
  if (options.direct && id.cookie != 0) {
    info.flags |= SocketInfo::kFlagDirect;
    info.source_fd = socket.get();
  }
  info.source_pid = me.pid;
  info.source_uid = me.uid;
  info.source_inode = me.inode;
  info.target_pid = who.pid;
  info.target_uid = who.uid;
  info.target_inode = who.inode;
  info.expires_ns = now_ns() + ms_to_ns(options.ttl);
  std::size_t got = 0;
  while (got < info.token.size()) {
    const ssize_t n = sys::retry_eintr(
        [&] { return ::getrandom(info.token.data() + got, info.token.size() - got, 0); });
    if (n < 0) {
      const int err = errno;
      sys::throw_errno("getrandom(16 bytes)", err);
    }
    got += static_cast<std::size_t>(n);
  }
  const std::string endpoint = listener_.endpoint().kind == Endpoint::Kind::unix_abstract
                                   ? "@" + listener_.endpoint().path
                                   : listener_.endpoint().path;
  std::memcpy(info.endpoint.data(), endpoint.data(), endpoint.size());

  std::lock_guard lock(mutex_);
  if (grants_.size() >= options_.max_grants) {
    throw Error(ErrorKind::overloaded, 0, op,
                "grant table full (" + std::to_string(options_.max_grants) + " grants)");
  }
  std::size_t for_target = 0;
  for (const auto& [gid, g] : grants_) {
    const bool same =
        who.inode != 0 ? g.info.target_inode == who.inode : g.info.target_pid == who.pid;
    if (same) ++for_target;
  }
  if (for_target >= options_.max_grants_per_target) {
    throw Error(ErrorKind::overloaded, 0, op,
                "pid " + std::to_string(who.pid) + " already has " + std::to_string(for_target) +
                    " unredeemed grants (the per-target quota)");
  }
  const std::uint64_t gid = next_id_++;
  // A pidfd polls readable once its process exits: the grant is reaped then, not at expiry.
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = tag(Tag::grant, gid);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, target_pidfd.get(), &ev) != 0) {
    const int err = errno;
    sys::throw_errno("epoll_ctl(ADD target pidfd " + std::to_string(target_pidfd.get()) + ")", err);
  }
  grants_.emplace(gid, Grant{info, std::move(socket), std::move(target_pidfd)});
  rearm_timer();
  return info;
}

std::optional<Fd> GrantServer::Impl::revoke(const SocketInfo& info) {
  std::lock_guard lock(mutex_);
  for (auto it = grants_.begin(); it != grants_.end(); ++it) {
    if (tokens_equal(it->second.info.token, info.token)) {
      Fd handed_back;
      if ((it->second.info.flags & SocketInfo::kFlagDirect) != 0) {
        // The number in the info must stop naming the socket, whatever the caller does with
        // the descriptor handed back: duplicate it elsewhere first, then close it. Without
        // the duplicate (EMFILE) nothing changes: closing the grant's copy would leave the
        // caller nothing to hold, so the grant stays and the caller may retry.
        const int copy = ::fcntl(it->second.socket.get(), F_DUPFD_CLOEXEC, 0);
        if (copy < 0) {
          const int err = errno;
          throw Error(ErrorKind::overloaded, err,
                      "revoke(direct grant fd " + std::to_string(it->second.socket.get()) + ")",
                      "cannot duplicate the socket under another number; the grant stays");
        }
        handed_back = Fd(copy);
      }
      Grant grant = std::move(it->second);
      grants_.erase(it);
      remove_grant_watch(grant);
      try {
        rearm_timer();
      } catch (const Error&) {
        // A timer left armed for the grant just gone only wakes the server early, and the
        // next process_events() rearms it; the descriptor must reach the caller regardless.
      }
      if (handed_back.valid()) return handed_back;
      return std::move(grant.socket);
    }
  }
  return std::nullopt;
}

void GrantServer::Impl::remove_grant_watch(Grant& grant) {
  if (grant.target_pidfd.valid()) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, grant.target_pidfd.get(), nullptr);
    grant.target_pidfd.reset();
  }
}

std::size_t GrantServer::Impl::process_events() {
  Events events;
  std::size_t handled = 0;
  std::exception_ptr failure;
  auto keep_first = [&] {
    if (!failure) failure = std::current_exception();
  };
  {
    std::lock_guard lock(mutex_);
    epoll_event ready[32];
    const int n = sys::retry_eintr([&] { return ::epoll_wait(epoll_.get(), ready, 32, 0); });
    if (n < 0) {
      const int err = errno;
      try {
        sys::throw_errno("epoll_wait(grant server)", err);
      } catch (...) {
        keep_first();
      }
    }
    // One event's failure must not cost the others theirs: each is handled on its own, and
    // expiry, deadlines and the timer are taken care of whatever happened above. A move
    // grant's socket travels in `events`, so dropping them would close it unreported.
    for (int i = 0; i < n; ++i) {
      ++handled;
      try {
        handle(ready[i], events);
      } catch (...) {
        keep_first();
      }
    }
    try {
      reap(events);
    } catch (...) {
      keep_first();
    }
    try {
      rearm_timer();
    } catch (...) {
      keep_first();
    }
  }
  const std::exception_ptr callback_failure = deliver(events);
  if (failure) std::rethrow_exception(failure);
  if (callback_failure) std::rethrow_exception(callback_failure);
  return handled;
}

void GrantServer::Impl::handle(const epoll_event& ready, Events& events) {
  const auto kind = static_cast<Tag>(ready.data.u64 >> kTagShift);
  const std::uint64_t id = ready.data.u64 & ((std::uint64_t{1} << kTagShift) - 1);
  switch (kind) {
    case Tag::listener:
      accept_ready(events);
      break;
    case Tag::session:
      session_ready(id, events);
      break;
    case Tag::grant: {
      auto it = grants_.find(id);
      if (it == grants_.end()) break;
      Grant grant = std::move(it->second);
      grants_.erase(it);
      remove_grant_watch(grant);
      ++stats_.target_exited;
      const bool direct = (grant.info.flags & SocketInfo::kFlagDirect) != 0;
      finish(std::move(grant), GrantOutcome::target_exited,
             direct ? "the target exited (it may have redeemed the grant directly)"
                    : "the target exited before redeeming",
             events);
      break;
    }
    case Tag::timer: {
      std::uint64_t expirations = 0;
      (void)!::read(timer_.get(), &expirations, sizeof expirations);
      break;
    }
  }
}

void GrantServer::Impl::accept_ready(Events& events) {
  while (sessions_.size() < options_.max_sessions) {
    std::optional<Channel> channel;
    try {
      channel = listener_.try_accept();
    } catch (const Error&) {
      // R21: at EMFILE the connection stays queued and the listener stays readable, and so
      // it does after any other failure that is not the connection's own (those, like
      // ECONNABORTED, try_accept absorbs). Stop watching it for a moment instead of
      // spinning; the timer brings it back.
      pause_listener();
      return;
    }
    if (!channel) return;
    Session session;
    session.channel = std::move(*channel);
    session.deadline_ns = now_ns() + ms_to_ns(options_.session_timeout);
    try {
      // R16: redeemers have no business sending descriptors to the source.
      (void)session.channel.refuse_descriptors();
      if (auto peer = session.channel.peer_pidfd()) {
        session.peer = pidfd::identify(peer->borrow());
      } else {
        // Before Linux 6.5: pid and uid as of connect() (documented fallback, R17).
        const PeerCredentials cred = session.channel.peer_credentials();
        session.peer.pid = cred.pid;
        session.peer.uid = cred.uid;
      }
    } catch (const Error&) {
      continue;  // the peer already exited: nothing to serve
    }
    const std::uint64_t sid = next_id_++;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag(Tag::session, sid);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, session.channel.native_handle().get(), &ev) != 0) {
      // ENOMEM or the max_user_watches limit: this connection cannot be served (it closes
      // here, which the redeemer sees as the source going away), and the next would fare
      // no better right now.
      pause_listener();
      return;
    }
    sessions_.emplace(sid, std::move(session));
    // The request is often queued already: serve it now and save a trip through epoll.
    session_ready(sid, events);
  }
  if (sessions_.size() >= options_.max_sessions) set_listener_events(0);
}

void GrantServer::Impl::pause_listener() {
  listener_resume_ns_ = now_ns() + kRetryPauseNs;
  set_listener_events(0);
}

void GrantServer::Impl::set_listener_events(std::uint32_t wanted) {
  epoll_event ev{};
  ev.events = wanted;
  ev.data.u64 = tag(Tag::listener, 0);
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listener_.native_handle().get(), &ev);
  listener_paused_ = wanted == 0;
}

void GrantServer::Impl::session_ready(std::uint64_t id, Events& events) {
  Message message;
  for (;;) {
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    Session& session = it->second;
    try {
      if (!session.channel.try_receive(message, {.max_fds = 0})) return;
    } catch (const Error& e) {
      end_session(id, GrantOutcome::failed,
                  e.kind() == ErrorKind::peer_gone
                      ? "the redeemer disconnected before acknowledging"
                      : e.what(),
                  events);
      return;
    }
    if (!on_message(session, message, events)) {
      // on_message has recorded any outcome; a grant still attached here means a reply
      // could not be sent, which fails the redemption (and returns a move's socket).
      end_session(id, GrantOutcome::failed, "could not answer the redeemer", events);
      return;
    }
  }
}

bool GrantServer::Impl::on_message(Session& session, const Message& message, Events& events) {
  const auto& payload = message.payload;
  switch (message.type) {
    case gp::kRedeem: {
      if (session.grant || payload.size() != 20) {
        send(session, gp::kRefused, text_bytes("malformed or repeated redeem request"));
        return false;
      }
      const auto* token = reinterpret_cast<const std::uint8_t*>(payload.data());
      const auto flags = static_cast<std::uint32_t>(get_le(payload.data() + 16, 4));
      auto found = grants_.end();
      for (auto it = grants_.begin(); it != grants_.end(); ++it) {
        if (tokens_equal(it->second.info.token, std::span(token, 16))) found = it;
      }
      if (found == grants_.end()) {
        send(session, gp::kRefused,
             text_bytes("no such grant: unknown, already used, expired or revoked"));
        return false;
      }
      // Single use: the grant leaves the table at its first presentation, whatever follows.
      Grant grant = std::move(found->second);
      grants_.erase(found);
      remove_grant_watch(grant);
      // A copy: `grant` is moved into the session below and read from after that.
      const SocketInfo info = grant.info;
      const bool match =
          info.target_inode != 0 && session.peer.inode != 0
              ? session.peer.inode == info.target_inode
              : session.peer.pid == info.target_pid && session.peer.uid == info.target_uid;
      if (!match) {
        const std::string why = "grant bound to pid " + std::to_string(info.target_pid) +
                                ", presented by pid " + std::to_string(session.peer.pid) + " (R17)";
        send(session, gp::kRefused, text_bytes(why));
        ++stats_.refused;
        finish(std::move(grant), GrantOutcome::refused, why, events);
        return false;
      }
      session.grant = std::move(grant);
      const bool fast = (flags & gp::kRedeemFastPath) != 0 && options_.offer_fast_path;
      std::byte reply[12];
      if (fast) {
        put_le(reply, static_cast<std::uint32_t>(session.grant->socket.get()), 4);
        put_le(reply + 4, info.cookie, 8);
        session.sent_number = true;
        return send(session, gp::kNumber, reply);
      }
      put_le(reply, info.cookie, 8);
      const BorrowedFd fds[] = {session.grant->socket.borrow()};
      session.sent_socket = true;
      return send(session, gp::kSocket, std::span(reply, 8), fds);
    }
    case gp::kFallback: {
      if (!session.grant || !session.sent_number || session.sent_socket) break;
      std::byte reply[8];
      put_le(reply, session.grant->info.cookie, 8);
      const BorrowedFd fds[] = {session.grant->socket.borrow()};
      session.sent_socket = true;
      return send(session, gp::kSocket, reply, fds);
    }
    case gp::kAck: {
      if (!session.grant || (!session.sent_number && !session.sent_socket)) break;
      ++stats_.redeemed;
      if (!session.sent_socket) ++stats_.fast_path;
      // For a move this closes the source's last copy: only now, after the ack (S5).
      Grant grant = std::move(*session.grant);
      session.grant.reset();
      finish(std::move(grant), GrantOutcome::redeemed, {}, events);
      return false;
    }
    case gp::kReject: {
      if (!session.grant) break;
      std::string why = "the redeemer rejected what it received: " +
                        std::string(message.payload_text().substr(0, 200));
      ++stats_.failed;
      Grant grant = std::move(*session.grant);
      session.grant.reset();
      finish(std::move(grant), GrantOutcome::failed, std::move(why), events);
      return false;
    }
    default:
      break;
  }
  // Anything out of order ends the redemption; a grant in progress counts as failed.
  if (session.grant) {
    ++stats_.failed;
    Grant grant = std::move(*session.grant);
    session.grant.reset();
    finish(std::move(grant), GrantOutcome::failed,
           "unexpected message type " + std::to_string(message.type), events);
  }
  return false;
}

bool GrantServer::Impl::send(Session& session, std::uint16_t type,
                             std::span<const std::byte> payload, std::span<const BorrowedFd> fds) {
  try {
    // A fresh connection's buffer always has room for these few bytes; a full one means a
    // misbehaving peer, which loses its redemption rather than stalling the server.
    return session.channel.try_send({.type = type, .payload = payload, .fds = fds}).has_value();
  } catch (const Error&) {
    return false;
  }
}

void GrantServer::Impl::end_session(std::uint64_t id, GrantOutcome outcome, std::string detail,
                                    Events& events) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.channel.native_handle().get(), nullptr);
  std::optional<Grant> grant = std::move(it->second.grant);
  sessions_.erase(it);
  if (grant) {
    ++stats_.failed;
    finish(std::move(*grant), outcome, std::move(detail), events);
  }
  if (listener_paused_ && listener_resume_ns_ == 0) set_listener_events(EPOLLIN);
}

void GrantServer::Impl::finish(Grant grant, GrantOutcome outcome, std::string detail,
                               Events& events) {
  remove_grant_watch(grant);
  GrantEvent event{grant.info, outcome, std::move(detail), {}};
  if (grant.info.mode == ShareMode::move && outcome != GrantOutcome::redeemed) {
    event.returned = std::move(grant.socket);
  }
  // Without a callback nobody reads the event: close the descriptor now, under the lock.
  if (options_.on_event) events.push_back(std::move(event));
}

void GrantServer::Impl::reap(Events& events) {
  const std::uint64_t now = now_ns();
  for (auto it = grants_.begin(); it != grants_.end();) {
    if (it->second.info.expires_ns <= now) {
      Grant grant = std::move(it->second);
      it = grants_.erase(it);
      if ((grant.info.flags & SocketInfo::kFlagDirect) != 0) {
        // A direct redemption sends nothing here: expiry is the only end the source sees.
        ++stats_.lapsed;
        finish(std::move(grant), GrantOutcome::lapsed,
               "direct grant expired: redeemed directly or not at all (the source cannot tell)",
               events);
        continue;
      }
      ++stats_.expired;
      finish(std::move(grant), GrantOutcome::expired, "not redeemed before it expired", events);
    } else {
      ++it;
    }
  }
  std::vector<std::uint64_t> late;
  for (const auto& [id, session] : sessions_) {
    if (session.deadline_ns <= now) late.push_back(id);
  }
  for (auto id : late) end_session(id, GrantOutcome::failed, "redemption timed out", events);
  if (listener_paused_ && listener_resume_ns_ != 0 && listener_resume_ns_ <= now) {
    listener_resume_ns_ = 0;
    if (sessions_.size() < options_.max_sessions) set_listener_events(EPOLLIN);
  }
}

void GrantServer::Impl::rearm_timer() {
  std::uint64_t next = 0;
  auto consider = [&](std::uint64_t t) {
    if (t != 0 && (next == 0 || t < next)) next = t;
  };
  for (const auto& [id, grant] : grants_) consider(grant.info.expires_ns);
  for (const auto& [id, session] : sessions_) consider(session.deadline_ns);
  consider(listener_resume_ns_);
  itimerspec spec{};
  if (next != 0) {
    spec.it_value.tv_sec = static_cast<time_t>(next / 1'000'000'000U);
    spec.it_value.tv_nsec = static_cast<long>(next % 1'000'000'000U);
  }
  // A time already past fires immediately, which is what a due expiry wants.
  if (::timerfd_settime(timer_.get(), TFD_TIMER_ABSTIME, &spec, nullptr) != 0) {
    const int err = errno;
    sys::throw_errno("timerfd_settime(grant expiry)", err);
  }
}

std::exception_ptr GrantServer::Impl::deliver(Events& events) {
  std::exception_ptr failure;
  if (!options_.on_event) return failure;
  // A callback that throws does not cost the remaining events their report.
  for (auto& event : events) {
    try {
      options_.on_event(event);
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
  }
  return failure;
}

GrantServerStats GrantServer::Impl::stats() const {
  std::lock_guard lock(mutex_);
  GrantServerStats out = stats_;
  out.pending = grants_.size();
  out.in_progress = 0;
  for (const auto& [id, session] : sessions_) {
    if (session.grant) ++out.in_progress;
  }
  return out;
}

// ---------------------------------------------------------------------------------------

Target Target::self() {
  return Target::pid(::getpid());
}

GrantServer::GrantServer(GrantServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

GrantServer::~GrantServer() = default;

SocketInfo GrantServer::duplicate(BorrowedFd socket, const Target& target,
                                  const GrantOptions& options) {
  return impl_->add(dup_cloexec(socket, "socket"), ShareMode::share, target, options);
}

SocketInfo GrantServer::move(Fd&& socket, const Target& target, const GrantOptions& options) {
  // On failure the caller keeps its descriptor: the grant works on a copy until it is made.
  SocketInfo info =
      impl_->add(dup_cloexec(socket.borrow(), "socket"), ShareMode::move, target, options);
  socket.reset();
  return info;
}

std::optional<Fd> GrantServer::revoke(const SocketInfo& info) {
  return impl_->revoke(info);
}

BorrowedFd GrantServer::native_handle() const noexcept {
  return impl_->epoll_.borrow();
}

std::size_t GrantServer::process_events() {
  return impl_->process_events();
}

const Endpoint& GrantServer::endpoint() const noexcept {
  return impl_->listener_.endpoint();
}

GrantServerStats GrantServer::stats() const {
  return impl_->stats();
}

}  // namespace sockshare
