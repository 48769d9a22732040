#include "worker.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "http.hpp"
#include "linux/sys.hpp"
#include "log.hpp"
#include "sockshare/dispatch.hpp"
#include "sockshare/error.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/systemd.hpp"

namespace sockshare::cli {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kReadChunk = 16384;
constexpr int kReadsPerEvent = 4;                   // fairness between connections
constexpr std::size_t kMaxPendingOutput = 1 << 20;  // stop answering pipelined requests beyond
constexpr std::int64_t kIdleTimeoutSeconds = 60;
constexpr std::int64_t kDrainGraceSeconds = 2;  // idle connections left once draining
constexpr std::size_t kAcceptBatch = 64;  // accepts per call while draining
constexpr int kDrainAcceptBatches = 4;  // what a draining worker takes from a shared queue
constexpr std::size_t kKeepBuffer = 4096;  // buffer capacity a closed connection's slot keeps
constexpr auto kLoadReportDelay = std::chrono::milliseconds(1);
// Finished handed-off connections whose final close waits for the dispatcher (see
// Server::close); beyond this many they are closed at once.
constexpr std::size_t kMaxDeferredCloses = 256;

// epoll tags: connection descriptors are non-negative ints; the rest live above 2^32.
constexpr std::uint64_t kTagChannel = 1ULL << 32;
constexpr std::uint64_t kTagSignal = 2ULL << 32;
constexpr std::uint64_t kTagListener = 3ULL << 32;  // | listener position

std::int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(Clock::now().time_since_epoch()).count();
}

struct Listener {
  Fd socket;
  std::string name;
  // TCP_DEFER_ACCEPT: what accept() returns has usually sent its first bytes (all but the
  // clients that stayed silent for the whole deferral, which are accepted empty).
  bool deferred = false;
};

// The listeners inherited by the systemd convention. sd_listen_fds() silently ignores a
// LISTEN_PID that is not ours; here it is an error the operator sees, because it means a
// wrapper process sat between the supervisor and the worker. LISTEN_* are unset either way.
std::vector<Listener> take_listen_fds() {
  systemd::ListenFds inherited = systemd::listen_fds_from_environment();
  switch (inherited.status) {
    case systemd::ListenStatus::activated:
      break;
    case systemd::ListenStatus::not_activated:
      throw Error(ErrorKind::invalid_input, 0, "built-in worker start-up",
                  "neither SOCKSHARE_CHANNEL_FD nor LISTEN_FDS is set: run it through "
                  "`sockshare serve`");
    case systemd::ListenStatus::pid_mismatch:
      throw Error(ErrorKind::refused, 0, "built-in worker start-up", inherited.diagnostic);
    case systemd::ListenStatus::invalid:
      throw Error(ErrorKind::invalid_input, 0, "built-in worker start-up", inherited.diagnostic);
  }
  std::vector<Listener> listeners;
  for (auto& socket : inherited.sockets) {
    if (auto why = mismatch(socket.identity, Expect::stream_listener)) {
      throw Error(
          ErrorKind::invalid_input, 0,
          "inherited descriptor " + std::to_string(socket.fd.get()) + " (" + socket.name + ")",
          *why);
    }
    // Shared with every worker and the supervisor (R14): all of them want it non-blocking.
    set_nonblocking(socket.fd.borrow(), true);
    const bool deferred = defer_accept_of(socket.fd.borrow()).count() > 0;
    listeners.push_back({std::move(socket.fd), std::move(socket.name), deferred});
  }
  if (listeners.empty()) {
    throw Error(ErrorKind::invalid_input, 0, "built-in worker start-up",
                "LISTEN_FDS=0: nothing to serve");
  }
  return listeners;
}

std::uint32_t index_from_environment() {
  const char* text = std::getenv(dispatch::kWorkerIndexEnv);
  return text != nullptr ? static_cast<std::uint32_t>(std::strtoul(text, nullptr, 10)) : 0;
}

struct Conn {
  Fd fd;
  std::string in;
  std::string out;
  std::size_t out_off = 0;
  std::uint32_t events = 0;  // registered epoll events, 0 when not in the epoll set
  // A handed-off connection is first registered EPOLLONESHOT: the usual one waits once for its
  // request and is closed after the answer, and a registration that has fired is inert, so
  // its close needs no EPOLL_CTL_DEL. `fired` says that happened (events is then kept, the
  // registration still exists); a connection kept open is switched to a lasting one.
  bool fired = false;
  bool close_after = false;  // close once `out` is flushed
  bool peer_eof = false;
  // Received from a dispatcher that may still hold its copy until our ack is processed: the
  // epoll registration outlives close() while another process holds the description, so it
  // must be removed explicitly.
  bool shared = false;
  std::int64_t last_active = 0;
  std::uint64_t requests = 0;  // answered on this connection
  bool continue_sent = false;  // "100 Continue" already went out for the request being read
};

class Server {
 public:
  int run();

 private:
  void setup_signals();
  void add(std::uint64_t tag, int fd, std::uint32_t events);
  void on_channel();
  bool on_listener(std::size_t position);  // true: a full batch, more may be queued
  void on_signal();
  void adopt(Fd socket, bool shared, std::vector<std::byte>* initial_bytes, bool data_first);
  void serve(Conn& conn, bool readable);
  bool read_some(Conn& conn);
  void answer(Conn& conn);
  bool flush(Conn& conn);
  void watch(Conn& conn, std::uint32_t events);
  void close(Conn& conn);
  void begin_drain(std::string_view why);
  void sweep_idle();
  void burn(std::uint32_t ms);
  void report_load();
  void report_busy(bool busy);
  void close_deferred();

  Fd epoll_;
  Fd signals_;
  Fd reserve_;  // spare descriptor for accept() at EMFILE (R21)
  std::optional<dispatch::Worker> worker_;
  std::vector<Listener> listeners_;
  std::vector<std::unique_ptr<Conn>> conns_;  // indexed by descriptor
  std::size_t active_ = 0;
  std::uint32_t index_ = 0;
  bool draining_ = false;
  std::string body_;
  http::Limits limits_;
  http::DateCache date_;
  std::vector<dispatch::Connection> batch_;
  std::int64_t last_sweep_ = 0;
  std::size_t reported_load_ = 0;
  std::uint64_t shed_ = 0;  // connections closed unserved at EMFILE
  std::int64_t shed_logged_at_ = -1;
  Clock::time_point change_since_{};  // when active_ first differed from reported_load_
  // Shut down and acknowledged, waiting for their final close (Server::close): those
  // finished since the previous batch arrived, and those finished before that.
  std::vector<Fd> deferred_;
  std::vector<Fd> deferred_older_;
};

void Server::add(std::uint64_t tag, int fd, std::uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = tag;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    sys::throw_errno("epoll_ctl(ADD, fd " + std::to_string(fd) + ")");
  }
}

void Server::setup_signals() {
  // SIGPIPE: every send carries MSG_NOSIGNAL; ignoring it also covers anything else.
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  if (worker_) {
    // A terminal's Ctrl-C reaches the whole process group: the supervisor turns it into a
    // drain over the channel, which is the orderly path for this worker.
    ::signal(SIGINT, SIG_IGN);
  } else {
    sigaddset(&set, SIGINT);
  }
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) sys::throw_errno("sigprocmask(SIG_BLOCK)");
  signals_ = Fd(::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signals_.valid()) sys::throw_errno("signalfd");
  add(kTagSignal, signals_.get(), EPOLLIN);
}

int Server::run() {
  epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) sys::throw_errno("epoll_create1");
  if (std::getenv(dispatch::kChannelFdEnv) != nullptr) {
    worker_.emplace(dispatch::Worker::from_environment());
    index_ = worker_->index();
  } else {
    listeners_ = take_listen_fds();
    index_ = index_from_environment();
    reserve_ = Fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  }
  body_ = "worker " + std::to_string(index_) + " pid " + std::to_string(::getpid());
  // serve sets the generation so a client can see a reload take effect.
  if (const char* generation = std::getenv("SOCKSHARE_GENERATION")) {
    body_ += " generation ";
    body_ += generation;
  }
  body_ += "\n";
  setup_signals();
  if (worker_) {
    add(kTagChannel, worker_->native_handle().get(), EPOLLIN);
  }
  for (std::size_t i = 0; i < listeners_.size(); ++i) {
    // EPOLLEXCLUSIVE: with one listener shared by every worker, a connection wakes one
    // worker instead of all of them (no thundering herd).
    add(kTagListener | i, listeners_[i].socket.get(), EPOLLIN | EPOLLEXCLUSIVE);
  }
  log::info("worker-up", "index={} pid={} mode={} listeners={}", index_, ::getpid(),
            worker_ ? "dispatch" : "inherit", listeners_.size());

  std::vector<epoll_event> events(256);
  last_sweep_ = now_seconds();
  while (!(draining_ && active_ == 0)) {
    int timeout = active_ > 0 || draining_ || !deferred_.empty() || !deferred_older_.empty() ? 1000 : -1;
    if (worker_ && !draining_ && active_ != reported_load_) timeout = 1;  // a report is due
    int n = sys::retry_eintr([&] {
      return ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout);
    });
    if (n < 0) sys::throw_errno("epoll_wait");
    for (int i = 0; i < n; ++i) {
      const std::uint64_t tag = events[static_cast<std::size_t>(i)].data.u64;
      const std::uint32_t ev = events[static_cast<std::size_t>(i)].events;
      if (tag == kTagChannel) {
        on_channel();
      } else if (tag == kTagSignal) {
        on_signal();
      } else if ((tag >> 32) == (kTagListener >> 32)) {
        on_listener(static_cast<std::size_t>(tag & 0xffffffffULL));
      } else {
        const auto fd = static_cast<std::size_t>(tag);
        // Earlier events of this batch may have closed it (drain, a sweep): skip stale ones.
        if (fd < conns_.size() && conns_[fd] && conns_[fd]->fd.valid()) {
          Conn& conn = *conns_[fd];
          if (conn.events & EPOLLONESHOT) conn.fired = true;
          serve(conn, (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0);
        }
      }
    }
    if (now_seconds() != last_sweep_) sweep_idle();
    report_load();
  }
  log::info("worker-down", "index={} pid={}", index_, ::getpid());
  return 0;
}

// Connections that open and close within a millisecond say nothing useful about load, and a
// report per change would double the channel traffic per connection (and make a worker that
// is merely waiting for a request look as busy as one deep in work): a rise is reported once
// it has lasted a millisecond (a burn says so at once: report_busy). A fall below what was
// reported goes out at once: a load the dispatcher still believes would keep connections
// from a worker that is free again.
void Server::report_load() {
  if (!worker_ || draining_) return;
  if (active_ == reported_load_) {
    change_since_ = Clock::time_point{};
    return;
  }
  const auto t = Clock::now();
  if (change_since_ == Clock::time_point{}) change_since_ = t;
  if (active_ > reported_load_ && t - change_since_ < kLoadReportDelay) return;
  change_since_ = Clock::time_point{};
  reported_load_ = active_;
  try {
    worker_->report_load(static_cast<std::uint32_t>(active_));
  } catch (const Error& e) {
    begin_drain(e.what());
  }
}

void Server::close_deferred() {
  deferred_older_.clear();  // closes them
  deferred_.clear();
}

void Server::on_channel() {
  // A new batch means the dispatcher has run a round since we acked earlier ones, and it
  // reads acks before it sends. The connections finished before the previous batch arrived
  // were acked two batches ago at least: the dispatcher has almost surely closed its copies,
  // so closing ours now is the last reference and frees them here. The newer ones wait one
  // more batch (their ack may have crossed the batch that just arrived).
  deferred_older_.clear();
  deferred_older_.swap(deferred_);
  batch_.clear();
  bool more = true;
  try {
    more = worker_->poll(batch_);
  } catch (const Error& e) {
    log::warn("channel-error", "index={} error={}", index_, log::value(e.what()));
    more = false;
  }
  for (auto& connection : batch_) {
    adopt(std::move(connection.socket), true, &connection.info.initial_bytes, false);
  }
  batch_.clear();
  if (!more) begin_drain("dispatcher asked to drain or went away");
}

bool Server::on_listener(std::size_t position) {
  if (position >= listeners_.size() || !listeners_[position].socket.valid()) return false;
  const int listener = listeners_[position].socket.get();
  // One connection per wake-up while serving: the listener is usually shared, and with
  // EPOLLEXCLUSIVE the next arrival then wakes another worker instead of this one taking a
  // run of them (fewer failed accepts, fewer connections waiting behind one worker; measured
  // in docs/benchmarks/serve.md). Level-triggered epoll reports what is still queued at once.
  // A draining worker takes what is queued in batches.
  const std::size_t batch = draining_ ? kAcceptBatch : 1;
  for (std::size_t i = 0; i < batch; ++i) {
    int fd = sys::retry_eintr(
        [&] { return ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC); });
    if (fd >= 0) {
      adopt(Fd(fd), false, nullptr, listeners_[position].deferred);
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return false;
    if (err == EMFILE || err == ENFILE) {
      // R21: with level-triggered epoll the pending connection would wake us forever. Free
      // the reserve, take the connection and close it: the client sees a clean close instead
      // of a hang, and the loop makes progress.
      reserve_.reset();
      int shed = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (shed >= 0) Fd closing(shed);
      reserve_ = Fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      ++shed_;
      // One line a second at most: a flood of clients must not become a flood of log lines.
      if (last_sweep_ != shed_logged_at_) {
        shed_logged_at_ = last_sweep_;
        log::warn("accept-overloaded", "index={} listener={} errno={} shed_total={}", index_,
                  listeners_[position].name, errno_name(err), shed_);
      }
      return false;
    }
    if (err == ECONNABORTED || err == EPROTO || err == EPERM) continue;  // that client gave up
    log::error("accept-failed", "index={} listener={} errno={}", index_, listeners_[position].name,
               errno_name(err));
    return false;
  }
  return true;
}

void Server::on_signal() {
  signalfd_siginfo info{};
  while (::read(signals_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
    if (info.ssi_signo == SIGHUP) {
      log::info("signal-ignored", "index={} signal=SIGHUP", index_);
      continue;
    }
    begin_drain(info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
  }
}

void Server::adopt(Fd socket, bool shared, std::vector<std::byte>* initial_bytes,
                   bool data_first) {
  const auto fd = static_cast<std::size_t>(socket.get());
  if (fd >= conns_.size()) conns_.resize(fd + 64);
  auto& slot = conns_[fd];
  if (!slot) slot = std::make_unique<Conn>();
  Conn& conn = *slot;
  conn.fd = std::move(socket);
  conn.in.clear();
  conn.out.clear();
  conn.out_off = 0;
  conn.events = 0;
  conn.fired = false;
  conn.close_after = false;
  conn.peer_eof = false;
  conn.shared = shared;
  conn.last_active = last_sweep_;
  conn.requests = 0;
  conn.continue_sent = false;
  ++active_;
  if (initial_bytes != nullptr && !initial_bytes->empty()) {
    // What the dispatcher peeked is the start of the request: it is no longer in the socket.
    conn.in.assign(reinterpret_cast<const char*>(initial_bytes->data()), initial_bytes->size());
  }
  if (shared || data_first) {
    // A handed-off connection, or one from a listener with deferred accept, usually has its
    // request waiting already: read now rather than paying an epoll round trip first (an
    // empty read falls back to waiting for it).
    serve(conn, true);
  } else {
    watch(conn, EPOLLIN);
  }
}

bool Server::read_some(Conn& conn) {
  // Into a scratch buffer, then appended: growing the string first would zero 16 KiB per read.
  char buffer[kReadChunk];
  for (int round = 0; round < kReadsPerEvent; ++round) {
    if (conn.in.size() > limits_.max_header_bytes + limits_.max_body_bytes + kReadChunk) {
      return true;  // the parser will refuse it; no need to buffer more
    }
    ssize_t n = sys::retry_eintr(
        [&] { return ::recv(conn.fd.get(), buffer, sizeof buffer, MSG_DONTWAIT); });
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    if (n == 0) {
      conn.peer_eof = true;
      return true;
    }
    conn.in.append(buffer, static_cast<std::size_t>(n));
    if (static_cast<std::size_t>(n) < kReadChunk) return true;
  }
  return true;
}

void Server::burn(std::uint32_t ms) {
  // Busy work on purpose: this simulates a CPU-bound request, so the worker is unavailable
  // to its other connections meanwhile, exactly what a load-aware policy should route around.
  // The dispatcher hears of it before (no new connection comes here meanwhile: it waits for
  // whichever worker frees first) and of its end at once.
  report_busy(true);
  const auto until = Clock::now() + std::chrono::milliseconds(ms);
  volatile std::uint64_t sink = 0;
  while (Clock::now() < until) {
    for (int i = 0; i < 1000; ++i) sink = sink + static_cast<std::uint64_t>(i);
  }
  report_busy(false);
}

void Server::report_busy(bool busy) {
  if (!worker_ || draining_) return;
  change_since_ = Clock::time_point{};
  reported_load_ = active_;
  try {
    worker_->report_load(static_cast<std::uint32_t>(active_), busy);
  } catch (const Error& e) {
    begin_drain(e.what());
  }
}

void Server::answer(Conn& conn) {
  std::size_t offset = 0;
  const std::string_view date = date_.line();
  while (!conn.close_after && conn.out.size() - conn.out_off < kMaxPendingOutput) {
    const std::string_view rest = std::string_view(conn.in).substr(offset);
    if (rest.empty()) break;
    const http::ParseResult r = http::parse_request(rest, limits_);
    if (r.status == http::Status::incomplete) {
      // A client that asked for it waits for this before it sends the body (curl: a second;
      // some clients: until their own timeout).
      if (r.awaiting_body && r.request.expect_continue && !conn.continue_sent) {
        conn.out += "HTTP/1.1 100 Continue\r\n\r\n";
        conn.continue_sent = true;
      }
      break;
    }
    conn.continue_sent = false;
    if (r.status != http::Status::complete) {
      int status = 400;
      std::string_view body = "bad request\n";
      switch (r.status) {
        case http::Status::too_large:
          status = r.request.body_too_large ? 413 : 431;
          body = "request too large\n";
          break;
        case http::Status::not_implemented:
          status = 501;
          body = "transfer codings are not supported\n";
          break;
        case http::Status::bad_version:
          status = 505;
          body = "HTTP/1.x only\n";
          break;
        default:
          break;
      }
      // After a framing error the rest of the stream cannot be trusted: answer and close.
      http::append_response(conn.out, status, body, false, true, false, date);
      conn.close_after = true;
      offset = conn.in.size();
      break;
    }
    const http::Request& req = r.request;
    const bool close = !req.keep_alive || draining_;
    const bool keep_alive_1_0 = !close && req.minor_version == 0;
    if (req.method == "GET" || req.method == "HEAD") {
      if (req.burn_ms > 0) burn(req.burn_ms);
      http::append_response(conn.out, 200, body_, req.head, close, keep_alive_1_0, date);
    } else {
      http::append_response(conn.out, 405, "only GET and HEAD\n", false, close, keep_alive_1_0,
                            date);
    }
    conn.close_after = close;
    ++conn.requests;
    offset += r.consumed;
  }
  if (offset > 0) conn.in.erase(0, offset);
}

bool Server::flush(Conn& conn) {
  while (conn.out_off < conn.out.size()) {
    ssize_t n = sys::retry_eintr([&] {
      return ::send(conn.fd.get(), conn.out.data() + conn.out_off, conn.out.size() - conn.out_off,
                    MSG_NOSIGNAL | MSG_DONTWAIT);
    });
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      return false;  // EPIPE, ECONNRESET: the client is gone
    }
    conn.out_off += static_cast<std::size_t>(n);
  }
  conn.out.clear();
  conn.out_off = 0;
  return true;
}

void Server::watch(Conn& conn, std::uint32_t events) {
  if (conn.events == 0 && conn.shared) {
    events |= EPOLLONESHOT;  // the first registration; any later one lasts (Conn::fired)
  } else if (!conn.fired && (conn.events & ~std::uint32_t{EPOLLONESHOT}) == events) {
    return;
  }
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = static_cast<std::uint64_t>(conn.fd.get());
  const int op = conn.events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
  if (::epoll_ctl(epoll_.get(), op, conn.fd.get(), &ev) != 0) {
    sys::throw_errno("epoll_ctl(fd " + std::to_string(conn.fd.get()) + ")");
  }
  conn.events = events;
  conn.fired = false;
}

void Server::serve(Conn& conn, bool readable) {
  conn.last_active = last_sweep_;
  if (readable && !read_some(conn)) {
    close(conn);
    return;
  }
  for (;;) {
    const std::size_t buffered = conn.in.size();
    answer(conn);
    if (!flush(conn)) {
      close(conn);
      return;
    }
    if (conn.out_off < conn.out.size()) {
      watch(conn, EPOLLOUT);  // reading resumes once the client has taken its answers
      return;
    }
    if (conn.close_after) {
      close(conn);
      return;
    }
    // answer() stops early when much output is pending; with it flushed, go on with the
    // pipelined requests still buffered, until only an incomplete one is left.
    if (conn.in.empty() || conn.in.size() == buffered) break;
  }
  if (conn.peer_eof) {
    close(conn);
    return;
  }
  watch(conn, EPOLLIN);
}

void Server::close(Conn& conn) {
  if (conn.events != 0 && conn.shared && !conn.fired) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn.fd.get(), nullptr);
  }
  conn.events = 0;
  conn.fired = false;
  if (conn.shared && !draining_ && deferred_.size() + deferred_older_.size() < kMaxDeferredCloses) {
    // The dispatcher closes its copy when our ack reaches it, often after we are done: its
    // close would then be the last one and free the socket, file and inode in the one process
    // every connection goes through. So the client gets its end of stream now (shutdown),
    // and our close waits for later batches to arrive (on_channel), by which time the
    // dispatcher has usually dropped its copy and ours is the last one.
    ::shutdown(conn.fd.get(), SHUT_RDWR);
    deferred_.push_back(std::move(conn.fd));
  } else if (conn.shared) {
    ::shutdown(conn.fd.get(), SHUT_RDWR);
  }
  conn.fd.reset();
  // The slot is reused by the next connection on this descriptor number: keep ordinary
  // buffers (no allocation per connection), give back only what a large request grew.
  conn.in.clear();
  conn.out.clear();
  if (conn.in.capacity() > kKeepBuffer) std::string().swap(conn.in);
  if (conn.out.capacity() > kKeepBuffer) std::string().swap(conn.out);
  --active_;
}

void Server::begin_drain(std::string_view why) {
  if (draining_) return;
  draining_ = true;
  close_deferred();
  log::info("worker-draining", "index={} pid={} reason={} connections={}", index_, ::getpid(),
            log::value(why), active_);
  if (worker_) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, worker_->native_handle().get(), nullptr);
  }
  for (std::size_t i = 0; i < listeners_.size(); ++i) {
    if (!listeners_[i].socket.valid()) continue;
    // Shared with the other workers: the registration must go before our copy does.
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listeners_[i].socket.get(), nullptr);
    // EPOLLEXCLUSIVE woke only us for what is queued now, and may have done so already: left
    // there, those clients would wait for another worker's next wake-up. Arrivals after the
    // EPOLL_CTL_DEL wake the others. A per-worker SO_REUSEPORT listener would reset what it
    // still queues when closed: taking it first helps there too.
    for (int batch = 0; batch < kDrainAcceptBatches && on_listener(i); ++batch) {
    }
    listeners_[i].socket.reset();
  }
  for (auto& slot : conns_) {
    if (!slot || !slot->fd.valid()) continue;
    Conn& conn = *slot;
    if (conn.requests > 0 && conn.in.empty() && conn.out_off == conn.out.size()) {
      // Idle between requests: a keep-alive client expects the server may close here.
      close(conn);
    } else if (conn.requests > 0 && conn.in.empty()) {
      conn.close_after = true;  // finish the answer being written, then close
    }
    // A connection that has not sent its first request yet was accepted for service: it
    // gets kDrainGraceSeconds for it (sweep_idle), then is closed.
  }
}

void Server::sweep_idle() {
  last_sweep_ = now_seconds();
  close_deferred();  // once a second, traffic or not: bounds how long a descriptor is kept
  for (auto& slot : conns_) {
    if (!slot || !slot->fd.valid()) continue;
    const std::int64_t idle = last_sweep_ - slot->last_active;
    if (idle >= kIdleTimeoutSeconds || (draining_ && idle >= kDrainGraceSeconds)) close(*slot);
  }
}

}  // namespace

int run_builtin_worker() {
  try {
    Server server;
    return server.run();
  } catch (const std::exception& e) {
    log::error("worker-failed", "pid={} error={}", ::getpid(), log::value(e.what()));
    return 1;
  }
}

}  // namespace sockshare::cli
