// The dispatcher's event loop (Linux: epoll). Hot path: listener readable -> accept a batch
// -> pick a worker for each -> one sendmsg per worker per wake-up. Every accepted connection
// stays owned here (an Fd) until the worker's ack names it, so a worker lost for any reason
// returns its unacknowledged connections to the policy (R12).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include "byte_order.hpp"
#include "linux/sys.hpp"
#include "sockshare/dispatch.hpp"

namespace sockshare::dispatch {
namespace {

using Clock = std::chrono::steady_clock;

// epoll keys: a tag in the top byte, an id below, looked up on every event so an event for a
// source removed earlier in the same batch is simply ignored.
enum Tag : std::uint64_t {
  kTagWake = 1, kTagListener = 2, kTagWorker = 3, kTagPeek = 4, kTagWatch = 5, kTagInbox = 6,
  kTagIntake = 7
};
constexpr std::uint64_t key(Tag tag, std::uint64_t id) { return (std::uint64_t{tag} << 56) | id; }

constexpr std::array<double, 19> kLatencyBoundsUs = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
    500000, 1000000, 2500000, 5000000};

// Room left in a batch for metadata, so header + metadata stays below the message limit.
constexpr std::size_t kBatchBytes = wire::kMaxMessage - wire::kHeaderSize - 4 * wire::kMaxFds;
constexpr std::size_t kMaxPeekBytes = 16384;
constexpr std::chrono::milliseconds kMaxEmfileBackoff{1000};
// A worker that refused a batch (R9) gets nothing new for this long.
constexpr std::chrono::milliseconds kRejectPause{100};
// ETOOMANYREFS/ENOBUFS do not make the channel writable later, so retry on a timer (R10).
constexpr std::chrono::milliseconds kOverloadRetry{10};
constexpr int kMessagesPerWake = 64;
constexpr std::size_t kKeepMetaBytes = 1024;  // per reused metadata buffer

std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

std::uint64_t hash_bytes(const void* data, std::size_t n) {  // FNV-1a, then mixed
  std::uint64_t h = 0xCBF29CE484222325ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ULL;
  return mix(h);
}

char* append_decimal(char* out, unsigned value) {
  char digits[10];
  int n = 0;
  do {
    digits[n++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0);
  while (n > 0) *out++ = digits[--n];
  return out;
}

// "a.b.c.d:port" into `out` (at least 22 bytes); returns the end.
char* format_ipv4_peer(const sockaddr_in& sin, char* out) {
  const auto* octets = reinterpret_cast<const unsigned char*>(&sin.sin_addr.s_addr);
  for (int i = 0; i < 4; ++i) {
    out = append_decimal(out, octets[i]);
    *out++ = i < 3 ? '.' : ':';
  }
  return append_decimal(out, ntohs(sin.sin_port));
}

std::int64_t realtime_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

struct Conn {
  Fd fd;
  ConnectionInfo info;
  Clock::time_point accepted;
  std::uint64_t client_hash = 0;
  std::uint64_t seq = 0;  // of the kConnections message that carried it
  Clock::time_point sent;
  bool sent_before = false;  // a resend counts as redispatched
  std::uint32_t lost_with = 0;  // workers cut off while it was in their oldest unacked batch
};

struct Listener {
  std::uint64_t id = 0;
  std::string name;
  Fd fd;
  bool watched = false;
};

struct WorkerState {
  WorkerId id = 0;
  std::uint32_t index = 0;
  pid_t pid = 0;
  Channel channel;
  bool hello = false;
  bool bye = false;
  bool drain_sent = false;
  // drain_worker(): no new connections; kDrain goes out after what is already picked for it.
  std::optional<Clock::time_point> drain_until;
  bool want_out = false;       // EPOLLOUT registered: the channel was full
  Clock::time_point blocked_since{};
  Clock::time_point paused_until{};  // after a reject or ETOOMANYREFS
  std::uint32_t reported_load = 0;
  bool reported_busy = false;  // its last load report carried kLoadBusyBit
  std::unordered_map<std::uint64_t, Conn> in_flight;
  std::deque<std::pair<Clock::time_point, std::uint64_t>> sent_order;  // for the ack timeout
  std::deque<Conn> outbox;     // picked for this worker, not yet sent
  bool dirty = false;

  [[nodiscard]] std::uint32_t load() const {
    return static_cast<std::uint32_t>(in_flight.size() + outbox.size());
  }
};

struct PeekState {
  Conn conn;
  Clock::time_point deadline;
};

struct Watch {
  int fd = -1;
  std::function<void(std::uint32_t)> callback;
};

struct Counters {
  std::atomic<std::uint64_t> accepted{0}, dispatched{0}, acknowledged{0}, redispatched{0},
      dropped{0}, abandoned{0}, accept_errors{0}, emfile_events{0}, backpressure_pauses{0},
      worker_protocol_errors{0}, workers_joined{0}, workers_lost{0}, rejected_batches{0},
      peek_timeouts{0};
  std::atomic<std::uint32_t> workers{0}, in_flight{0}, pending{0};
  std::array<std::atomic<std::uint64_t>, kLatencyBoundsUs.size() + 1> latency{};
  std::atomic<std::uint64_t> latency_sum_ns{0};
};

void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) {
  c.fetch_add(n, std::memory_order_relaxed);
}

}  // namespace

struct Dispatcher::Impl {
  DispatcherOptions opt;
  Fd epoll;
  // Every worker channel, for reading (EPOLLIN). It sits in `epoll` except while connections
  // flow (lazy_read_window: acks then ride along with the next accepts instead of waking the
  // loop each); the main set holds the channels only for EPOLLOUT and hang-ups.
  Fd inbox;
  // The listeners, and connections waiting for their first bytes (peeks): always in `epoll`,
  // as a set. A socket that becomes readable wakes whoever waits on it as a synchronous
  // wake-up, a hint that the waking task (the client completing its handshake over loopback,
  // or whatever task a network interrupt came in on) is about to sleep, so the scheduler puts
  // the woken dispatcher on that task's CPU. The waker does not sleep, and the dispatcher then
  // competes with it for every connection. A nested epoll set passes readiness on as an
  // ordinary wake-up, which lets the scheduler choose (docs/DISPATCH.md).
  Fd intake;
  bool inbox_watched = false;
  bool dispatched_this_round = false;
  bool lazy_reads = false;
  Clock::time_point last_dispatch_round{};
  Fd wake;
  std::atomic<bool> stop_requested{false};
  Counters counters;

  std::vector<std::unique_ptr<Listener>> listeners;
  std::vector<std::unique_ptr<WorkerState>> workers;  // in join order: round robin walks it
  std::unordered_map<std::uint64_t, std::unique_ptr<PeekState>> peeking;
  std::deque<std::uint64_t> peek_order;  // constant timeout: deadlines are in this order
  std::deque<Conn> pending;
  std::unordered_map<std::uint64_t, Watch> watches;
  std::unordered_map<int, std::uint64_t> watch_by_fd;

  std::uint64_t next_id = 1;  // listeners, workers, watches
  std::uint64_t next_conn = 1;
  std::size_t rr_cursor = 0;
  bool draining = false;
  bool drained = false;
  Clock::time_point drain_deadline{};
  Clock::time_point emfile_until{};
  std::chrono::milliseconds emfile_backoff{0};
  bool paused_for_backpressure = false;
  std::vector<WorkerView> views;  // scratch for custom policies
  std::vector<WorkerState*> candidates;
  std::vector<std::vector<std::byte>> meta_scratch;
  std::vector<std::span<const std::byte>> meta_spans;
  std::vector<BorrowedFd> fd_scratch;
  Message message;
  Clock::time_point next_timer_check{};

  explicit Impl(DispatcherOptions options) : opt(std::move(options)) {
    if (opt.policy == Policy::custom && !opt.custom_pick) {
      throw Error(ErrorKind::invalid_input, 0, "Dispatcher", "Policy::custom needs custom_pick");
    }
    if (opt.max_in_flight == 0 || opt.accept_batch == 0) {
      throw Error(ErrorKind::invalid_input, 0, "Dispatcher",
                  "max_in_flight and accept_batch must be at least 1");
    }
    if (opt.peek_bytes > kMaxPeekBytes) {
      throw Error(ErrorKind::invalid_input, 0, "Dispatcher",
                  "peek_bytes above " + std::to_string(kMaxPeekBytes));
    }
    epoll = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll.valid()) sys::throw_errno("epoll_create1");
    wake = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake.valid()) sys::throw_errno("eventfd");
    ctl(EPOLL_CTL_ADD, wake.get(), EPOLLIN, key(kTagWake, 0));
    inbox = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (!inbox.valid()) SOCKSHARE_THROW_ERRNO("epoll_create1 (inbox)");
    ctl(EPOLL_CTL_ADD, inbox.get(), EPOLLIN, key(kTagInbox, 0));
    inbox_watched = true;
    intake = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (!intake.valid()) SOCKSHARE_THROW_ERRNO("epoll_create1 (intake)");
    ctl(EPOLL_CTL_ADD, intake.get(), EPOLLIN, key(kTagIntake, 0));
  }

  void log(const std::string& line) const {
    if (opt.log) opt.log(line);
  }

  void ctl(int op, int fd, std::uint32_t events, std::uint64_t k) { ctl_in(epoll, op, fd, events, k); }
  static void ctl_in(const Fd& set, int op, int fd, std::uint32_t events, std::uint64_t k) {
    if (!change(set, op, fd, events, k)) {
      SOCKSHARE_THROW_ERRNO("epoll_ctl(op " + std::to_string(op) + ", fd " + std::to_string(fd) + ")");
    }
  }
  // A descriptor about to close leaves the set: another process may hold its file, and the
  // registration lives as long as the file does.
  void forget(int fd) noexcept { forget_in(epoll, fd); }
  static void forget_in(const Fd& set, int fd) noexcept {
    epoll_event ev{};
    ::epoll_ctl(set.get(), EPOLL_CTL_DEL, fd, &ev);
  }

  static bool change(const Fd& set, int op, int fd, std::uint32_t events, std::uint64_t k) noexcept {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = k;
    return ::epoll_ctl(set.get(), op, fd, &ev) == 0;
  }

  void add_channel(const WorkerState& w) {
    const int fd = w.channel.native_handle().get();
    ctl(EPOLL_CTL_ADD, fd, 0, key(kTagWorker, w.id));  // hang-ups and errors are always reported
    if (!change(inbox, EPOLL_CTL_ADD, fd, EPOLLIN, key(kTagWorker, w.id))) {
      const int err = errno;
      forget(fd);
      sys::throw_errno("epoll_ctl(EPOLL_CTL_ADD, fd " + std::to_string(fd) + ") on the inbox", err);
    }
  }
  void forget_channel(const WorkerState& w) noexcept {
    const int fd = w.channel.native_handle().get();
    forget(fd);
    forget_in(inbox, fd);
  }

  // Reads what every worker sent, without waiting.
  void read_inbox(Clock::time_point now) {
    std::array<epoll_event, 64> ready{};
    const int n = ::epoll_wait(inbox.get(), ready.data(), static_cast<int>(ready.size()), 0);
    if (n < 0 && errno != EINTR) SOCKSHARE_THROW_ERRNO("epoll_wait (inbox)");
    for (int i = 0; i < n; ++i) {
      on_worker_event(ready[i].data.u64 & ((std::uint64_t{1} << 56) - 1), ready[i].events, now);
    }
  }

  // Accepts on the ready listeners and reads the peeks that got bytes, without waiting.
  void read_intake(Clock::time_point now) {
    std::array<epoll_event, 64> ready{};
    const int n = ::epoll_wait(intake.get(), ready.data(), static_cast<int>(ready.size()), 0);
    if (n < 0 && errno != EINTR) SOCKSHARE_THROW_ERRNO("epoll_wait (intake)");
    for (int i = 0; i < n; ++i) {
      const std::uint64_t id = ready[i].data.u64 & ((std::uint64_t{1} << 56) - 1);
      if (static_cast<Tag>(ready[i].data.u64 >> 56) == kTagPeek) {
        finish_peek(id, true, now);
        continue;
      }
      for (auto& l : listeners) {
        if (l->id == id && l->watched) accept_from(*l, now);
      }
      if (broken_listener != 0) drop_listener(std::exchange(broken_listener, 0));
    }
  }

  // The inbox leaves the main set while connections flow (each round reads it anyway) and
  // comes back once they stop, or whenever the loop waits on what workers say: a hello, acks
  // or load reports that let it accept again, byes during a drain.
  void update_inbox(Clock::time_point now) {
    if (dispatched_this_round) {
      lazy_reads = now - last_dispatch_round < opt.lazy_read_window;
      last_dispatch_round = now;
      dispatched_this_round = false;
    } else if (now - last_dispatch_round >= opt.lazy_read_window) {
      lazy_reads = false;
    }
    bool waiting_on_workers = listeners.empty() || !pending.empty() || draining;
    for (const auto& l : listeners) waiting_on_workers = waiting_on_workers || !l->watched;
    for (const auto& w : workers) waiting_on_workers = waiting_on_workers || w->drain_until || !w->hello;
    const bool want = !lazy_reads || waiting_on_workers;
    if (want == inbox_watched) return;
    if (!want) {
      forget(inbox.get());
      inbox_watched = false;
      return;
    }
    // Should this fail (kernel memory), the inbox stays out and next_timeout() keeps the
    // loop coming back to read it.
    inbox_watched = change(epoll, EPOLL_CTL_ADD, inbox.get(), EPOLLIN, key(kTagInbox, 0));
  }

  WorkerState* find_worker(WorkerId id) {
    for (auto& w : workers) {
      if (w->id == id) return w.get();
    }
    return nullptr;
  }

  static std::string describe(const WorkerState& w) {
    return "worker " + std::to_string(w.index) + " (pid " + std::to_string(w.pid) + ")";
  }

  // ---- capacity and policies ----

  [[nodiscard]] bool available(const WorkerState& w, Clock::time_point now) const {
    return w.hello && !w.bye && !w.drain_sent && !w.drain_until && !w.want_out && now >= w.paused_until &&
           w.load() < in_flight_limit() && !busy(w, now);
  }

  // While a worker says it is busy, long requests are about: least-loaded then gives each
  // worker one connection at a time, the next once it has taken that one (and had the chance
  // to say it is busy in turn), so connections wait in the backlog for whichever worker frees
  // first instead of piling up behind one that may be starting a long request. Without busy
  // workers, batches of up to max_in_flight keep the per-connection cost low.
  [[nodiscard]] std::size_t in_flight_limit() const {
    return opt.policy == Policy::least_loaded && any_reported_busy ? 1 : opt.max_in_flight;
  }

  void refresh_any_reported_busy() {
    any_reported_busy = std::any_of(workers.begin(), workers.end(),
                                    [](const auto& w) { return w->reported_busy; });
  }

  // Least-loaded only. A worker says so before long work (kLoadBusyBit); otherwise a
  // responsive worker acks within microseconds of a send, and one that has not for busy_after
  // is inside a long request. sent_order's front is its oldest unacknowledged connection
  // (acks and rejects pop what they settled).
  [[nodiscard]] bool busy(const WorkerState& w, Clock::time_point now) const {
    if (opt.policy != Policy::least_loaded) return false;
    if (w.reported_busy) return true;
    return opt.busy_after.count() > 0 && !w.sent_order.empty() &&
           now - w.sent_order.front().first >= opt.busy_after;
  }

  // Connections the workers can take right now, minus those already waiting for one.
  [[nodiscard]] std::size_t free_capacity(Clock::time_point now) const {
    std::size_t room = 0;
    for (const auto& w : workers) {
      if (available(*w, now)) room += in_flight_limit() - w->load();
    }
    const std::size_t waiting = pending.size() + peeking.size();
    return room > waiting ? room - waiting : 0;
  }

  WorkerState* pick(const Conn& conn, Clock::time_point now) {
    const std::size_t n = workers.size();
    if (n == 0) return nullptr;
    switch (opt.policy) {
      case Policy::round_robin:
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t at = (rr_cursor + i) % n;
          if (available(*workers[at], now)) {
            rr_cursor = at + 1;
            return workers[at].get();
          }
        }
        return nullptr;
      case Policy::least_loaded: {
        // Equal totals go to the worker with fewer connections in service by its own report:
        // the rest of the total is connections on their way, which a responsive worker takes
        // in microseconds, while one it reports may be a long request (a worker that is busy
        // on one request must not get the second connection of a burst as a tie). Ties left
        // go to the first one after the rotating cursor, so equal workers share evenly.
        WorkerState* best = nullptr;
        std::uint64_t best_load = 0;
        std::uint32_t best_reported = 0;
        std::size_t best_at = 0;
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t at = (rr_cursor + i) % n;
          WorkerState& w = *workers[at];
          if (!available(w, now)) continue;
          const std::uint64_t load = std::uint64_t{w.reported_load} + w.load();
          if (best == nullptr || load < best_load ||
              (load == best_load && w.reported_load < best_reported)) {
            best = &w;
            best_load = load;
            best_reported = w.reported_load;
            best_at = at;
          }
        }
        if (best != nullptr) rr_cursor = best_at + 1;
        return best;
      }
      case Policy::client_hash: {
        // Rendezvous hashing over worker indices: a client keeps its worker index across
        // worker restarts, and only the clients of a removed index move.
        WorkerState* best = nullptr;
        std::uint64_t best_score = 0;
        for (auto& w : workers) {
          if (!available(*w, now)) continue;
          const std::uint64_t score = mix(conn.client_hash ^ mix(std::uint64_t{w->index} + 1));
          if (best == nullptr || score > best_score) {
            best = w.get();
            best_score = score;
          }
        }
        return best;
      }
      case Policy::custom: {
        views.clear();
        candidates.clear();
        for (auto& w : workers) {
          if (!available(*w, now)) continue;
          views.push_back({w->id, w->index, w->pid, w->load(), w->reported_load, true, w->reported_busy});
          candidates.push_back(w.get());
        }
        if (candidates.empty()) return nullptr;
        // A faulty policy must not lose the connection or stop the loop: it is logged and
        // the first candidate serves.
        std::size_t at = 0;
        try {
          at = opt.custom_pick(conn.info, views);
        } catch (const std::exception& e) {
          log(std::string("custom dispatch policy threw: ") + e.what());
          at = 0;
        }
        if (at >= candidates.size()) {
          log("custom dispatch policy returned position " + std::to_string(at) + " of " +
              std::to_string(candidates.size()) + " candidates");
          at = 0;
        }
        return candidates[at];
      }
    }
    return nullptr;
  }

  // Gives a connection to a worker's outbox, or holds it until one has room.
  void route(Conn conn, Clock::time_point now) {
    if (WorkerState* w = pick(conn, now)) {
      w->outbox.push_back(std::move(conn));
      w->dirty = true;
      return;
    }
    if (pending.size() >= opt.max_pending) {
      pending.pop_front();  // closes it: the oldest has waited longest, its client likely gave up
      bump(counters.dropped);
    }
    pending.push_back(std::move(conn));
  }

  void route_pending(Clock::time_point now) {
    while (!pending.empty()) {
      WorkerState* w = pick(pending.front(), now);
      if (w == nullptr) return;
      w->outbox.push_back(std::move(pending.front()));
      pending.pop_front();
      w->dirty = true;
    }
  }

  // ---- accepting ----

  void accept_from(Listener& l, Clock::time_point now) {
    std::size_t room = std::min(opt.accept_batch, free_capacity(now));
    while (room > 0) {
      sockaddr_storage addr{};
      socklen_t len = sizeof addr;
      const int fd = sys::retry_eintr([&] {
        return sys::seam().accept4(l.fd.get(), reinterpret_cast<sockaddr*>(&addr), &len,
                                   SOCK_CLOEXEC | SOCK_NONBLOCK);
      });
      if (fd < 0) {
        const int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) return;
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
          // R21: with level-triggered epoll a pending connection at EMFILE would wake us
          // forever. Stop polling the listeners for a while; the backlog keeps the clients.
          bump(counters.emfile_events);
          emfile_backoff = emfile_backoff.count() == 0
                               ? opt.emfile_backoff
                               : std::min(emfile_backoff * 2, kMaxEmfileBackoff);
          emfile_until = now + emfile_backoff;
          log("accept on " + l.name + ": " + errno_name(err) + "; not accepting for " +
              std::to_string(emfile_backoff.count()) + " ms (R21)");
          return;
        }
        bump(counters.accept_errors);
        if (err == EBADF || err == EINVAL || err == ENOTSOCK || err == EOPNOTSUPP || err == EFAULT) {
          // The listener itself is unusable (e.g. shut down): level-triggered epoll would
          // report it forever, so it leaves the set.
          log("listener " + l.name + " stops: accept4: " + errno_name(err));
          broken_listener = l.id;
          return;
        }
        // ECONNABORTED, EPERM (firewall), EPROTO ...: that one connection is gone. Counted
        // against the batch so a storm of them cannot hold the loop here.
        --room;
        continue;
      }
      --room;
      emfile_backoff = std::chrono::milliseconds(0);
      bump(counters.accepted);
      Conn conn;
      conn.fd = Fd(fd);
      conn.accepted = now;
      conn.info.id = next_conn++;
      conn.info.listener = l.name;
      conn.info.accepted_at_ns = realtime_ns();
      describe_peer(conn, addr, len);
      if (opt.peek_bytes > 0) {
        start_peek(std::move(conn), now);
      } else {
        route(std::move(conn), now);
      }
    }
  }

  void describe_peer(Conn& conn, const sockaddr_storage& addr, socklen_t len) {
    char text[INET6_ADDRSTRLEN] = {};
    if (addr.ss_family == AF_INET && len >= sizeof(sockaddr_in)) {
      const auto& sin = reinterpret_cast<const sockaddr_in&>(addr);
      // By hand: inet_ntop and to_string go through printf machinery and temporaries, and
      // this runs for every connection in the one process they all pass through.
      char* end = format_ipv4_peer(sin, text);
      conn.info.peer.assign(text, static_cast<std::size_t>(end - text));
      if (opt.policy == Policy::client_hash) conn.client_hash = hash_bytes(&sin.sin_addr, 4);
    } else if (addr.ss_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
      const auto& sin6 = reinterpret_cast<const sockaddr_in6&>(addr);
      ::inet_ntop(AF_INET6, &sin6.sin6_addr, text, sizeof text);
      conn.info.peer = "[" + std::string(text) + "]:" + std::to_string(ntohs(sin6.sin6_port));
      if (opt.policy == Policy::client_hash) conn.client_hash = hash_bytes(&sin6.sin6_addr, 16);
    } else {
      conn.info.peer = "unix";
      if (opt.policy == Policy::client_hash) {
        // Unix clients have no address; the connecting process (its uid and pid) is the
        // closest thing to "the same client".
        ucred cred{};
        socklen_t cl = sizeof cred;
        if (::getsockopt(conn.fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0) {
          conn.client_hash = hash_bytes(&cred, sizeof cred);
        }
      }
    }
  }

  std::uint64_t broken_listener = 0;
  bool any_reported_busy = false;  // some worker's last load report carried kLoadBusyBit

  void drop_listener(std::uint64_t id) {
    for (auto it = listeners.begin(); it != listeners.end(); ++it) {
      if ((*it)->id != id) continue;
      if ((*it)->watched) forget_in(intake, (*it)->fd.get());
      listeners.erase(it);
      return;
    }
  }

  // ---- first bytes ----

  // Reads what has arrived, without blocking: done when the connection is ready to hand off
  // (bytes arrived, end of stream, or the buffer is full), wait for more, or failed (reset).
  enum class PeekResult { done, wait, failed };
  PeekResult read_first_bytes(Conn& conn) {
    auto& buf = conn.info.initial_bytes;
    while (buf.size() < opt.peek_bytes) {
      const std::size_t have = buf.size();
      buf.resize(opt.peek_bytes);
      const ssize_t n =
          sys::retry_eintr([&] { return ::read(conn.fd.get(), buf.data() + have, opt.peek_bytes - have); });
      if (n < 0) {
        buf.resize(have);
        if (errno == EAGAIN || errno == EWOULDBLOCK) return have > 0 ? PeekResult::done : PeekResult::wait;
        return PeekResult::failed;
      }
      buf.resize(have + static_cast<std::size_t>(n));
      if (n == 0) return PeekResult::done;  // the client already closed its side
    }
    return PeekResult::done;
  }

  void start_peek(Conn conn, Clock::time_point now) {
    switch (read_first_bytes(conn)) {
      case PeekResult::done: route(std::move(conn), now); return;
      case PeekResult::failed: bump(counters.dropped); return;
      case PeekResult::wait: break;
    }
    const std::uint64_t id = conn.info.id;
    if (!change(intake, EPOLL_CTL_ADD, conn.fd.get(), EPOLLIN | EPOLLRDHUP, key(kTagPeek, id))) {
      // No room to watch it (ENOMEM, max_user_watches): hand it off without first bytes
      // rather than lose it.
      const int err = errno;
      log("peek on connection " + std::to_string(id) + ": epoll_ctl: " + errno_name(err));
      route(std::move(conn), now);
      return;
    }
    auto state = std::make_unique<PeekState>();
    state->conn = std::move(conn);
    state->deadline = now + opt.peek_timeout;
    peeking.emplace(id, std::move(state));
    peek_order.push_back(id);
  }

  void finish_peek(std::uint64_t id, bool read_now, Clock::time_point now) {
    auto it = peeking.find(id);
    if (it == peeking.end()) return;
    PeekResult r = read_now ? read_first_bytes(it->second->conn) : PeekResult::done;
    if (r == PeekResult::wait) return;
    Conn conn = std::move(it->second->conn);
    peeking.erase(it);
    forget_in(intake, conn.fd.get());
    if (r == PeekResult::failed) {
      bump(counters.dropped);
      return;
    }
    route(std::move(conn), now);
  }

  void expire_peeks(Clock::time_point now) {
    while (!peek_order.empty()) {
      auto it = peeking.find(peek_order.front());
      if (it == peeking.end()) {
        peek_order.pop_front();
        continue;
      }
      if (!draining && it->second->deadline > now) return;
      const std::uint64_t id = peek_order.front();
      peek_order.pop_front();
      if (it->second->conn.info.initial_bytes.empty()) bump(counters.peek_timeouts);
      finish_peek(id, false, now);
    }
  }

  // ---- sending ----

  void flush(WorkerState& w, Clock::time_point now) {
    w.dirty = false;
    while (!w.outbox.empty() && !w.want_out && now >= w.paused_until) {
      const std::size_t limit = std::min(w.outbox.size(), wire::kMaxFds);
      std::size_t count = 0;
      std::size_t bytes = 0;
      meta_scratch.resize(limit);
      meta_spans.clear();
      fd_scratch.clear();
      while (count < limit) {
        encode_connection_info(w.outbox[count].info, meta_scratch[count]);
        if (count > 0 && bytes + meta_scratch[count].size() > kBatchBytes) break;
        bytes += meta_scratch[count].size();
        meta_spans.emplace_back(meta_scratch[count]);
        fd_scratch.push_back(w.outbox[count].fd.borrow());
        ++count;
      }
      std::optional<std::uint64_t> seq;
      try {
        seq = w.channel.try_send({.type = kConnections, .fds = fd_scratch, .fd_meta = meta_spans});
        release_large_scratch(count);
      } catch (const Error& e) {
        release_large_scratch(count);
        if (e.kind() == ErrorKind::overloaded) {
          // R10: ETOOMANYREFS (too many descriptors in flight for this uid) or ENOBUFS.
          w.paused_until = now + kOverloadRetry;
          reroute_outbox(w, now);
          return;
        }
        cut(w, "send failed: " + std::string(e.what()), now);
        return;
      }
      if (!seq) {
        // The worker is not reading: wait for room instead of growing anything (R10).
        w.want_out = true;
        w.blocked_since = now;
        ctl(EPOLL_CTL_MOD, w.channel.native_handle().get(), EPOLLOUT, key(kTagWorker, w.id));
        reroute_outbox(w, now);
        return;
      }
      for (std::size_t i = 0; i < count; ++i) {
        Conn conn = std::move(w.outbox.front());
        w.outbox.pop_front();
        if (conn.sent_before) bump(counters.redispatched);
        conn.sent_before = true;
        conn.seq = *seq;
        conn.sent = now;
        w.sent_order.emplace_back(now, conn.info.id);
        const std::uint64_t id = conn.info.id;
        w.in_flight.emplace(id, std::move(conn));
      }
      bump(counters.dispatched, count);
      dispatched_this_round = true;
    }
    if ((draining || w.drain_until) && w.outbox.empty() && !w.drain_sent && !w.bye && !w.want_out) {
      send_drain(w, now);
    }
  }

  // Metadata buffers are reused from batch to batch; one that grew for a large peek
  // (--peek-bytes up to 16 KiB, 253 to a batch) is given back instead of kept for good.
  void release_large_scratch(std::size_t used) {
    for (std::size_t i = 0; i < used && i < meta_scratch.size(); ++i) {
      if (meta_scratch[i].capacity() > kKeepMetaBytes) std::vector<std::byte>().swap(meta_scratch[i]);
    }
  }

  // A worker that cannot take its batch now is no candidate any more: what was picked for it
  // and never sent goes to the others instead of waiting for it.
  void reroute_outbox(WorkerState& w, Clock::time_point now) {
    std::deque<Conn> back;
    back.swap(w.outbox);
    for (auto& c : back) route(std::move(c), now);
  }

  void send_drain(WorkerState& w, Clock::time_point now) {
    const auto until = draining && w.drain_until ? std::min(drain_deadline, *w.drain_until)
                       : draining                ? drain_deadline
                                                 : *w.drain_until;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - now);
    std::byte payload[4];
    const auto ms = static_cast<std::uint32_t>(std::max<std::int64_t>(0, left.count()));
    for (int i = 0; i < 4; ++i) payload[i] = static_cast<std::byte>((ms >> (8 * i)) & 0xFF);
    try {
      if (w.channel.try_send({.type = kDrain, .payload = payload})) w.drain_sent = true;
    } catch (const Error& e) {
      cut(w, "drain failed: " + std::string(e.what()), now);
    }
  }

  // ---- losing workers ----

  // Removes a worker; its unacknowledged connections go back to the policy.
  void cut(WorkerState& w, const std::string& why, Clock::time_point now, bool lost = true) {
    const WorkerId id = w.id;
    const pid_t pid = w.pid;
    const bool held = !w.in_flight.empty();
    forget_channel(w);
    // A worker acks what it reads before it serves it (Worker::poll), so of what it held
    // unacknowledged, only its oldest batch can have been in its hands when it died: the
    // rest was still queued in the channel, and gets no strike.
    std::uint64_t oldest_batch = std::numeric_limits<std::uint64_t>::max();
    for (const auto& [cid, c] : w.in_flight) oldest_batch = std::min(oldest_batch, c.seq);
    // In send order, so the oldest clients are served first.
    std::vector<Conn> back;
    back.reserve(w.in_flight.size() + w.outbox.size());
    std::uint64_t abandoned = 0;
    for (auto& [sent, cid] : w.sent_order) {
      auto it = w.in_flight.find(cid);
      if (it == w.in_flight.end()) continue;
      Conn& c = it->second;
      if (c.seq == oldest_batch && opt.max_attempts > 0 && ++c.lost_with >= opt.max_attempts) {
        // Closing our copy ends the connection for the client once the worker's copy is
        // gone too: at once if it died; a live worker cut off is its supervisor's to stop.
        ++abandoned;
      } else {
        back.push_back(std::move(it->second));
      }
      w.in_flight.erase(it);
    }
    if (lost || held) {
      std::string line = describe(w) + " cut off: " + why + "; " + std::to_string(back.size()) +
                         " unacknowledged connection(s) re-queued";
      if (abandoned > 0) {
        line += ", " + std::to_string(abandoned) + " closed (each was lost with " +
                std::to_string(opt.max_attempts) + " workers: max_attempts)";
      }
      log(line);
    }
    if (abandoned > 0) {
      bump(counters.dropped, abandoned);
      bump(counters.abandoned, abandoned);
    }
    for (auto& c : w.outbox) back.push_back(std::move(c));
    std::unique_ptr<WorkerState> owned;
    for (auto it = workers.begin(); it != workers.end(); ++it) {
      if ((*it)->id == id) {
        owned = std::move(*it);
        workers.erase(it);
        refresh_any_reported_busy();
        break;
      }
    }
    bump(counters.workers_lost);
    for (auto& c : back) route(std::move(c), now);
    owned.reset();  // closes the channel
    if (lost && lost_hook != nullptr && *lost_hook) (*lost_hook)(id, pid);
  }

  // Dispatcher::on_worker_lost (the Dispatcher neither moves nor copies, so this stays valid).
  std::function<void(WorkerId, pid_t)>* lost_hook = nullptr;

  // ---- receiving from workers ----

  static std::uint64_t get_u64(const std::byte* p) { return bytes::load_le<std::uint64_t>(p); }
  static std::uint32_t get_u32(const std::byte* p) { return bytes::load_le<std::uint32_t>(p); }

  void violation(WorkerState& w, const std::string& why, Clock::time_point now) {
    bump(counters.worker_protocol_errors);
    cut(w, "protocol violation: " + why, now);
  }

  void on_worker_event(WorkerId id, std::uint32_t events, Clock::time_point now) {
    WorkerState* w = find_worker(id);
    if (w == nullptr) return;
    if ((events & EPOLLOUT) && w->want_out) {
      w->want_out = false;
      ctl(EPOLL_CTL_MOD, w->channel.native_handle().get(), 0, key(kTagWorker, w->id));
      w->dirty = true;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    // Workers send no descriptors: any that arrive are closed and the worker cut off (R16).
    const ReceiveOptions options{.expect = Expect::anything, .max_fds = 0};
    for (int i = 0; i < kMessagesPerWake; ++i) {
      try {
        if (!w->channel.try_receive(message, options)) return;
      } catch (const Error& e) {
        if (e.kind() == ErrorKind::peer_gone) {
          cut(*w, w->bye ? "left after bye" : "channel closed", now, !w->bye);
        } else if (e.kind() == ErrorKind::protocol) {
          violation(*w, e.what(), now);
        } else {
          cut(*w, e.what(), now);
        }
        return;
      }
      if (!handle(*w, now)) return;  // w is gone
    }
  }

  // Returns false when the worker was cut off.
  bool handle(WorkerState& w, Clock::time_point now) {
    const auto& p = message.payload;
    switch (message.type) {
      case kHello:
        if (p.size() != 8) {
          violation(w, "hello of " + std::to_string(p.size()) + " bytes", now);
          return false;
        }
        if (w.hello) {
          violation(w, "second hello", now);
          return false;
        }
        w.hello = true;
        if (w.pid == 0) w.pid = static_cast<pid_t>(get_u32(p.data() + 4));
        if (get_u32(p.data()) != w.index) {
          log(describe(w) + " says it is worker " + std::to_string(get_u32(p.data())));
        }
        log(describe(w) + " ready");
        if (draining || w.drain_until) w.dirty = true;  // it joined late: tell it to drain at once
        return true;
      case kAck: {
        if (p.empty() || p.size() % 8 != 0) {
          violation(w, "ack of " + std::to_string(p.size()) + " bytes", now);
          return false;
        }
        // The ack may have waited in the inbox (lazy reads): with the kernel's stamp the
        // latency ends at its arrival, measured on the clock of the accept stamp.
        const std::int64_t arrived_ns = message.queued_realtime_ns;
        for (std::size_t off = 0; off < p.size(); off += 8) {
          const std::uint64_t cid = get_u64(p.data() + off);
          auto it = w.in_flight.find(cid);
          if (it == w.in_flight.end()) {
            violation(w, "ack for connection " + std::to_string(cid) + " it does not hold", now);
            return false;
          }
          record_latency(arrived_ns != 0 ? std::chrono::nanoseconds(std::max<std::int64_t>(
                                               0, arrived_ns - it->second.info.accepted_at_ns))
                                         : Clock::duration(now - it->second.accepted));
          w.in_flight.erase(it);  // our copy closes: the worker owns the connection now
        }
        bump(counters.acknowledged, p.size() / 8);
        drop_settled(w);
        return true;
      }
      case kLoad:
        if (p.size() != 4) {
          violation(w, "load report of " + std::to_string(p.size()) + " bytes", now);
          return false;
        }
        w.reported_load = get_u32(p.data()) & ~kLoadBusyBit;
        w.reported_busy = (get_u32(p.data()) & kLoadBusyBit) != 0;
        refresh_any_reported_busy();
        return true;
      case kReject: {
        if (p.size() != 8) {
          violation(w, "reject of " + std::to_string(p.size()) + " bytes", now);
          return false;
        }
        const std::uint64_t seq = get_u64(p.data());
        bump(counters.rejected_batches);
        std::vector<Conn> back;
        for (auto it = w.in_flight.begin(); it != w.in_flight.end();) {
          if (it->second.seq == seq) {
            back.push_back(std::move(it->second));
            it = w.in_flight.erase(it);
          } else {
            ++it;
          }
        }
        drop_settled(w);
        log(describe(w) + " lost batch " + std::to_string(seq) + " on receipt (R9); " +
            std::to_string(back.size()) + " connection(s) re-queued");
        w.paused_until = now + kRejectPause;
        reroute_outbox(w, now);
        std::sort(back.begin(), back.end(),
                  [](const Conn& a, const Conn& b) { return a.info.id < b.info.id; });
        for (auto& c : back) route(std::move(c), now);
        return true;
      }
      case kBye:
        if (!p.empty()) {
          violation(w, "bye with payload", now);
          return false;
        }
        w.bye = true;
        return true;
      default:
        violation(w, "unexpected message type " + std::to_string(message.type), now);
        return false;
    }
  }

  static void drop_settled(WorkerState& w) {
    while (!w.sent_order.empty() && !w.in_flight.contains(w.sent_order.front().second)) {
      w.sent_order.pop_front();
    }
  }

  void record_latency(Clock::duration d) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
    const double us = static_cast<double>(ns) / 1000.0;
    std::size_t bucket = 0;
    while (bucket < kLatencyBoundsUs.size() && us > kLatencyBoundsUs[bucket]) ++bucket;
    counters.latency[bucket].fetch_add(1, std::memory_order_relaxed);
    counters.latency_sum_ns.fetch_add(static_cast<std::uint64_t>(ns), std::memory_order_relaxed);
  }

  // ---- timers ----

  void check_timers(Clock::time_point now) {
    if (!peek_order.empty()) expire_peeks(now);
    for (auto& w : workers) {
      // A paused worker (reject, ETOOMANYREFS) gets its waiting batch once the pause ends.
      if (w->paused_until != Clock::time_point{} && now >= w->paused_until) {
        w->paused_until = Clock::time_point{};
        if (!w->outbox.empty()) w->dirty = true;
      }
    }
    if (now < next_timer_check) return;
    next_timer_check = now + std::min<Clock::duration>(opt.ack_timeout / 4, std::chrono::milliseconds(100));
    for (std::size_t i = 0; i < workers.size();) {
      WorkerState& w = *workers[i];
      drop_settled(w);
      const bool late_ack = !w.sent_order.empty() && now - w.sent_order.front().first > opt.ack_timeout;
      const bool stuck = w.want_out && now - w.blocked_since > opt.ack_timeout;
      if (late_ack || stuck) {
        cut(w,
            late_ack ? "no acknowledgement within " + std::to_string(opt.ack_timeout.count()) + " ms"
                     : "channel full for " + std::to_string(opt.ack_timeout.count()) + " ms",
            now);
        continue;  // cut erased it: the same position holds the next worker
      }
      ++i;
    }
  }

  // ---- listener watching (back-pressure, EMFILE, drain) ----

  void update_listeners(Clock::time_point now) {
    const bool room = free_capacity(now) > 0;
    const bool want = !draining && now >= emfile_until && room;
    // Back-pressure means workers exist and are all full, not "none has said hello yet".
    const bool any_ready = std::any_of(workers.begin(), workers.end(), [](const auto& w) { return w->hello; });
    if (!want && !room && !draining && !paused_for_backpressure && !listeners.empty() && any_ready) {
      paused_for_backpressure = true;
      bump(counters.backpressure_pauses);
    }
    if (room) paused_for_backpressure = false;
    for (auto& l : listeners) {
      if (l->watched == want) continue;
      if (want) ctl_in(intake, EPOLL_CTL_ADD, l->fd.get(), EPOLLIN, key(kTagListener, l->id));
      else forget_in(intake, l->fd.get());
      l->watched = want;
    }
  }

  // Next moment a timer needs the loop: peek deadlines, ack timeouts, EMFILE, pauses, drain.
  Clock::time_point next_wakeup(Clock::time_point now) const {
    Clock::time_point at = Clock::time_point::max();
    if (!peek_order.empty()) {
      auto it = peeking.find(peek_order.front());
      at = it != peeking.end() ? it->second->deadline : now;
    }
    bool any_in_flight = false;
    for (const auto& w : workers) {
      if (!w->in_flight.empty() || w->want_out) any_in_flight = true;
      if (w->paused_until > now) at = std::min(at, w->paused_until);
    }
    if (any_in_flight) at = std::min(at, next_timer_check);
    if (emfile_until > now) at = std::min(at, emfile_until);
    if (draining && !drained) at = std::min(at, drain_deadline);
    if (!inbox_watched) {
      const auto lazy_until = last_dispatch_round + opt.lazy_read_window;
      at = std::min(at, lazy_until > now ? lazy_until : now + opt.lazy_read_window);
    }
    return at;
  }

  void finish_drain_if_done(Clock::time_point now) {
    if (!draining || drained) return;
    bool done = pending.empty() && peeking.empty();
    for (const auto& w : workers) {
      if (!w->in_flight.empty() || !w->outbox.empty() || (!w->bye && w->hello)) done = false;
    }
    if (done) {
      drained = true;
      log("drain complete");
      return;
    }
    if (now < drain_deadline) return;
    std::uint64_t lost = pending.size();
    pending.clear();
    for (auto& w : workers) {
      lost += w->in_flight.size() + w->outbox.size();
      w->in_flight.clear();
      w->outbox.clear();
      w->sent_order.clear();
    }
    bump(counters.dropped, lost);
    drained = true;
    log("drain deadline passed; " + std::to_string(lost) + " unacknowledged connection(s) dropped");
  }

  void publish_gauges() {
    std::uint32_t in_flight = 0;
    for (const auto& w : workers) in_flight += static_cast<std::uint32_t>(w->in_flight.size());
    counters.workers.store(static_cast<std::uint32_t>(workers.size()), std::memory_order_relaxed);
    counters.in_flight.store(in_flight, std::memory_order_relaxed);
    counters.pending.store(static_cast<std::uint32_t>(pending.size() + peeking.size()),
                           std::memory_order_relaxed);
  }

  // Milliseconds until the next timer needs the loop, -1 for none.
  [[nodiscard]] int timer_ms(Clock::time_point now) const {
    const auto wake_at = next_wakeup(now);
    if (wake_at == Clock::time_point::max()) return -1;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(wake_at - now).count();
    return static_cast<int>(std::clamp<std::int64_t>(left, 0, 1 << 30));
  }

  void run_once(std::chrono::milliseconds timeout) {
    auto now = Clock::now();
    int wait_ms = timeout.count() < 0 ? -1 : static_cast<int>(std::min<std::int64_t>(timeout.count(), 1 << 30));
    if (const int timer = timer_ms(now); timer >= 0) wait_ms = wait_ms < 0 ? timer : std::min(wait_ms, timer);
    std::array<epoll_event, 64> events{};
    const int n = ::epoll_wait(epoll.get(), events.data(), static_cast<int>(events.size()), wait_ms);
    if (n < 0 && errno != EINTR) sys::throw_errno("epoll_wait");
    now = Clock::now();
    // Workers first: acks free capacity for the accepts in the same round. While the inbox is
    // in the main set, its silence in this wait means it has nothing.
    bool inbox_ready = !inbox_watched;
    for (int i = 0; i < n && !inbox_ready; ++i) inbox_ready = static_cast<Tag>(events[i].data.u64 >> 56) == kTagInbox;
    if (inbox_ready) read_inbox(now);
    for (int pass = 0; pass < 2; ++pass) {
      for (int i = 0; i < n; ++i) {
        const std::uint64_t k = events[i].data.u64;
        const auto tag = static_cast<Tag>(k >> 56);
        const std::uint64_t id = k & ((std::uint64_t{1} << 56) - 1);
        const bool first_pass = tag == kTagWorker || tag == kTagWake;
        if ((pass == 0) != first_pass) continue;
        switch (tag) {
          case kTagWake: {
            std::uint64_t value = 0;
            (void)!::read(wake.get(), &value, sizeof value);
            break;
          }
          case kTagWorker: on_worker_event(id, events[i].events, now); break;
          case kTagIntake: read_intake(now); break;
          case kTagInbox: break;  // read above
          case kTagListener:
          case kTagPeek: break;  // only in the intake set
          case kTagWatch: {
            auto it = watches.find(id);
            if (it != watches.end()) {
              auto callback = it->second.callback;  // a copy: the callback may unwatch itself
              callback(events[i].events);
            }
            break;
          }
        }
      }
      if (pass == 0) route_pending(now);
    }
    check_timers(now);
    route_pending(now);
    for (std::size_t i = 0; i < workers.size(); ++i) {
      // flush() may cut the worker (erasing it): re-check the position each time.
      WorkerState* w = workers[i].get();
      if (w->dirty || ((draining || w->drain_until) && !w->drain_sent && w->hello)) {
        const WorkerId id = w->id;
        flush(*w, now);
        if (i < workers.size() && workers[i]->id != id) --i;  // erased: revisit this slot
      }
    }
    // A cut or a full channel during flush re-routes connections, possibly to workers
    // already flushed. Terminates: each round sends, or takes a worker out of the candidates.
    for (bool again = true; again;) {
      again = false;
      for (std::size_t i = 0; i < workers.size(); ++i) {
        if (!workers[i]->dirty) continue;
        again = true;
        flush(*workers[i], now);
        break;  // flush may have erased workers: restart the scan
      }
    }
    update_listeners(now);
    finish_drain_if_done(now);
    update_inbox(now);
    publish_gauges();
  }
};

Dispatcher::Dispatcher(DispatcherOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->lost_hook = &on_worker_lost;
}

Dispatcher::~Dispatcher() = default;

void Dispatcher::add_listener(std::string name, Fd listening_socket) {
  // Bounded so a full batch of metadata always fits one message.
  if (name.size() > 255) {
    throw Error(ErrorKind::invalid_input, 0, "Dispatcher::add_listener", "listener name longer than 255 bytes");
  }
  const SocketIdentity id = identify(listening_socket.borrow());
  if (auto why = mismatch(id, Expect::stream_listener)) {
    throw Error(ErrorKind::invalid_input, 0, "Dispatcher::add_listener(" + name + ")", *why);
  }
  set_nonblocking(listening_socket.borrow(), true);
  auto l = std::make_unique<Listener>();
  l->id = impl_->next_id++;
  l->name = std::move(name);
  l->fd = std::move(listening_socket);
  impl_->listeners.push_back(std::move(l));
  impl_->update_listeners(Clock::now());
}

WorkerId Dispatcher::add_worker(Channel channel, pid_t pid, std::uint32_t index) {
  auto w = std::make_unique<WorkerState>();
  w->id = impl_->next_id++;
  w->pid = pid;
  w->index = index;
  w->channel = std::move(channel);
  // Arrival times keep the handoff latency exact when acks are read late (lazy reads); a
  // channel that cannot stamp them only makes the latency include the wait.
  try {
    w->channel.record_arrival_times();
  } catch (const Error&) {
  }
  impl_->add_channel(*w);
  const WorkerId id = w->id;
  impl_->workers.push_back(std::move(w));
  impl_->update_inbox(Clock::now());  // its hello is awaited: read at once, not with the next accepts
  bump(impl_->counters.workers_joined);
  impl_->publish_gauges();
  return id;
}

void Dispatcher::remove_worker(WorkerId id) {
  if (WorkerState* w = impl_->find_worker(id)) {
    const bool quiet = w->bye && w->in_flight.empty();
    impl_->cut(*w, quiet ? "left after bye" : "removed", Clock::now(), false);
    impl_->publish_gauges();
  }
}

BorrowedFd Dispatcher::native_handle() const noexcept { return impl_->epoll.borrow(); }

void Dispatcher::watch(BorrowedFd fd, std::uint32_t events, std::function<void(std::uint32_t)> on_ready) {
  if (impl_->watch_by_fd.contains(fd.get())) {
    throw Error(ErrorKind::invalid_input, 0, "Dispatcher::watch(fd " + std::to_string(fd.get()) + ")",
                "already watched");
  }
  const std::uint64_t id = impl_->next_id++;
  impl_->ctl(EPOLL_CTL_ADD, fd.get(), events, key(kTagWatch, id));
  impl_->watches.emplace(id, Watch{fd.get(), std::move(on_ready)});
  impl_->watch_by_fd.emplace(fd.get(), id);
}

void Dispatcher::unwatch(BorrowedFd fd) {
  auto it = impl_->watch_by_fd.find(fd.get());
  if (it == impl_->watch_by_fd.end()) return;
  impl_->forget(fd.get());
  impl_->watches.erase(it->second);
  impl_->watch_by_fd.erase(it);
}

std::vector<WorkerView> Dispatcher::workers() const {
  std::vector<WorkerView> out;
  for (const auto& w : impl_->workers) {
    out.push_back({w->id, w->index, w->pid, w->load(), w->reported_load, w->hello, w->reported_busy});
  }
  return out;
}

void Dispatcher::run_once(std::chrono::milliseconds timeout) { impl_->run_once(timeout); }

std::chrono::milliseconds Dispatcher::next_timeout() const {
  return std::chrono::milliseconds(impl_->timer_ms(Clock::now()));
}

void Dispatcher::run() {
  while (!impl_->stop_requested.load(std::memory_order_relaxed) && !impl_->drained) {
    impl_->run_once(kForever);
  }
}

void Dispatcher::stop() {
  impl_->stop_requested.store(true, std::memory_order_relaxed);
  const std::uint64_t one = 1;
  // write() is async-signal-safe; a full eventfd counter already means "wake up".
  (void)!::write(impl_->wake.get(), &one, sizeof one);
}

void Dispatcher::drain(std::chrono::milliseconds deadline) {
  Impl& d = *impl_;
  const auto now = Clock::now();
  const auto until = now + deadline;
  if (d.draining) {
    d.drain_deadline = std::min(d.drain_deadline, until);
    return;
  }
  d.draining = true;
  d.drain_deadline = until;
  for (auto& l : d.listeners) {
    if (l->watched) d.forget_in(d.intake, l->fd.get());
  }
  d.listeners.clear();
  d.expire_peeks(now);  // hand off what was peeking, with what it has
  d.route_pending(now);
  for (auto& w : d.workers) w->dirty = true;
  d.log("draining: listeners closed, deadline " + std::to_string(deadline.count()) + " ms");
}

void Dispatcher::drain_worker(WorkerId id, std::chrono::milliseconds deadline) {
  Impl& d = *impl_;
  WorkerState* w = d.find_worker(id);
  if (w == nullptr || w->drain_until) return;
  const auto now = Clock::now();
  w->drain_until = now + deadline;
  w->dirty = true;
  // Picked for it but not sent yet: those go to the workers that stay.
  d.reroute_outbox(*w, now);
  d.log(d.describe(*w) + " draining, deadline " + std::to_string(deadline.count()) + " ms");
}

bool Dispatcher::drained() const noexcept { return impl_->drained; }

bool Dispatcher::stopped() const noexcept { return impl_->stop_requested.load(std::memory_order_relaxed); }

Stats Dispatcher::stats() const {
  const Counters& c = impl_->counters;
  auto r = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  Stats s;
  s.accepted = r(c.accepted);
  s.dispatched = r(c.dispatched);
  s.acknowledged = r(c.acknowledged);
  s.redispatched = r(c.redispatched);
  s.dropped = r(c.dropped);
  s.abandoned = r(c.abandoned);
  s.accept_errors = r(c.accept_errors);
  s.emfile_events = r(c.emfile_events);
  s.backpressure_pauses = r(c.backpressure_pauses);
  s.worker_protocol_errors = r(c.worker_protocol_errors);
  s.workers_joined = r(c.workers_joined);
  s.workers_lost = r(c.workers_lost);
  s.rejected_batches = r(c.rejected_batches);
  s.peek_timeouts = r(c.peek_timeouts);
  s.workers = c.workers.load(std::memory_order_relaxed);
  s.in_flight = c.in_flight.load(std::memory_order_relaxed);
  s.pending = c.pending.load(std::memory_order_relaxed);
  s.latency_bounds_us.assign(kLatencyBoundsUs.begin(), kLatencyBoundsUs.end());
  s.latency_counts.reserve(c.latency.size());
  for (const auto& bucket : c.latency) s.latency_counts.push_back(r(bucket));
  s.latency_sum_us = static_cast<double>(r(c.latency_sum_ns)) / 1000.0;
  return s;
}

}  // namespace sockshare::dispatch
