// The supervisor with real worker processes (this test binary re-executed as helpers):
// dispatch mode end to end, inherit mode by the systemd convention, restart with backoff,
// crash-loop throttling, graceful stop.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <set>

#include "dispatch_support.hpp"
#include "linux/sys.hpp"
#include "sockshare/supervisor.hpp"

namespace sockshare {
namespace {

using dispatch::Dispatcher;
using test::Client;
using namespace std::chrono_literals;

// Supervised helpers run without the harness's readiness pipe: they must not call ready().

SOCKSHARE_HELPER(sup_exit) { return std::atoi(ctx.args().at(0).c_str()); }

// Dispatch-mode worker: serves until the dispatcher drains it.
SOCKSHARE_HELPER(sup_worker) {
  dispatch::Worker worker = dispatch::Worker::from_environment();
  std::vector<dispatch::Connection> got;
  for (;;) {
    got.clear();
    const bool more = worker.wait(got);
    for (auto& c : got) test::serve(c, worker.index());
    if (!more) return 0;
  }
}

// Dispatch-mode worker that answers its first batch with garbage.
SOCKSHARE_HELPER(sup_garbage) {
  dispatch::Worker worker = dispatch::Worker::from_environment();
  sys::wait_ready(worker.native_handle().get(), POLLIN, sys::kNoDeadline);
  const char junk[] = "garbage";
  (void)!::send(worker.native_handle().get(), junk, sizeof junk, MSG_NOSIGNAL);
  for (;;) ::pause();
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

// Inherit-mode worker: reports what it inherited to each client it accepts on fd 3.
// With the argument "ignore-term" it ignores SIGTERM first (a worker that will not stop).
SOCKSHARE_HELPER(sup_inherit) {
  if (!ctx.args().empty() && ctx.args()[0] == "ignore-term") {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    ::sigaction(SIGTERM, &ign, nullptr);
  }
  const bool blocking = (::fcntl(3, F_GETFL) & O_NONBLOCK) == 0;
  std::string fd3 = identify(BorrowedFd(3)).describe();
  std::replace(fd3.begin(), fd3.end(), ' ', '_');
  const bool fd4_open = ::fcntl(4, F_GETFD) >= 0;
  const std::string report = "pid=" + std::to_string(::getpid()) + " listen_pid=" + env_or("LISTEN_PID", "-") +
                             " fds=" + env_or("LISTEN_FDS", "-") + " names=" + env_or("LISTEN_FDNAMES", "-") +
                             " index=" + env_or("SOCKSHARE_WORKER_INDEX", "-") + " fd3=" + fd3 +
                             " fd4=" + (fd4_open ? "open" : "closed") +
                             " blocking=" + (blocking ? "yes" : "no") +
                             " defer=" + std::to_string(defer_accept_of(BorrowedFd(3)).count()) + "\n";
  for (;;) {
    pollfd p{3, POLLIN, 0};
    if (::poll(&p, 1, -1) < 0) continue;
    // The listener is shared and non-blocking: another worker may have taken the client.
    Fd client(::accept4(3, nullptr, nullptr, SOCK_CLOEXEC));
    if (!client.valid()) continue;
    (void)!::send(client.get(), report.data(), report.size(), MSG_NOSIGNAL);
  }
}

std::vector<std::string> helper_argv(const std::string& name, std::vector<std::string> args = {}) {
  std::vector<std::string> argv{test::self_exe(), "--sockshare-helper", name};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

bool spin(Supervisor& s, const std::function<bool()>& done, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    s.run_once(5ms);
  }
  return done();
}

class SupervisorTest : public test::FdLeakTest {
protected:
  std::vector<std::string> log_;
  std::vector<std::pair<std::chrono::steady_clock::time_point, SupervisorEvent>> events_;

  SupervisorOptions options(std::vector<std::string> argv, std::uint32_t workers) {
    SupervisorOptions o;
    o.argv = std::move(argv);
    o.workers = workers;
    o.initial_backoff = 10ms;
    o.ignore_sigpipe = false;  // keep SIGPIPE fatal in the test process: it proves MSG_NOSIGNAL
    o.log = [this](std::string_view line) { log_.emplace_back(line); };
    return o;
  }
  void record(Supervisor& s) {
    s.on_event = [this](const SupervisorEvent& e) { events_.emplace_back(std::chrono::steady_clock::now(), e); };
  }
  int count(SupervisorEvent::Kind kind) const {
    return static_cast<int>(std::count_if(events_.begin(), events_.end(),
                                          [&](const auto& e) { return e.second.kind == kind; }));
  }
  bool logged(const std::string& text) const {
    return std::any_of(log_.begin(), log_.end(), [&](const std::string& l) { return l.find(text) != std::string::npos; });
  }
};

TEST_F(SupervisorTest, S6_CrashingWorkerIsRestartedWithBackoffAndTheCrashLoopThrottled) {
  Dispatcher d;
  auto o = options(helper_argv("sup_exit", {"3"}), 1);
  o.initial_backoff = 20ms;
  o.max_backoff = 320ms;
  o.crash_loop_exits = 4;
  o.crash_loop_window = 10s;
  Supervisor s(d, std::move(o));
  record(s);
  s.start();
  // Bounded: 1.5 s of supervision. Spinning would mean hundreds of starts.
  const auto until = std::chrono::steady_clock::now() + 1500ms;
  while (std::chrono::steady_clock::now() < until) s.run_once(20ms);

  std::vector<std::chrono::milliseconds> delays;
  std::vector<std::chrono::steady_clock::time_point> starts;
  std::vector<std::chrono::steady_clock::time_point> exits;
  for (const auto& [at, e] : events_) {
    if (e.kind == SupervisorEvent::Kind::restart_scheduled) delays.push_back(e.delay);
    if (e.kind == SupervisorEvent::Kind::started) starts.push_back(at);
    if (e.kind == SupervisorEvent::Kind::exited) {
      exits.push_back(at);
      EXPECT_EQ(e.exit_status, 3);
    }
  }
  ASSERT_GE(delays.size(), 5u);
  EXPECT_EQ(delays[0], 20ms);
  EXPECT_EQ(delays[1], 40ms);
  EXPECT_EQ(delays[2], 80ms);
  EXPECT_EQ(delays[3], 320ms);  // fourth exit within the window: crash loop, throttled
  for (std::size_t i = 4; i < delays.size(); ++i) EXPECT_EQ(delays[i], 320ms);
  EXPECT_EQ(count(SupervisorEvent::Kind::crash_loop), 1);  // reported once, not per exit
  EXPECT_TRUE(logged("crash looping")) << (log_.empty() ? "" : log_.back());
  EXPECT_LE(starts.size(), 9u);
  // Each restart waited at least the delay it announced.
  for (std::size_t i = 0; i + 1 < starts.size() && i < exits.size() && i < delays.size(); ++i) {
    EXPECT_GE(starts[i + 1] - exits[i], delays[i] - 2ms) << "restart " << i;
  }
  const auto st = s.status();
  ASSERT_EQ(st.size(), 1u);
  EXPECT_TRUE(st[0].crash_looping);
  EXPECT_EQ(st[0].last_exit_status, 3);
}

TEST_F(SupervisorTest, S6_DispatchModeServesRestartsAKilledWorkerAndDrains) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const Endpoint ep = local_endpoint(listener.borrow());
  Dispatcher d({.policy = dispatch::Policy::round_robin});
  d.add_listener("web", std::move(listener));
  Supervisor s(d, options(helper_argv("sup_worker"), 2));
  record(s);
  s.start();
  auto ready = [&] {
    const auto views = d.workers();
    return std::count_if(views.begin(), views.end(), [](const auto& v) { return v.ready; }) == 2;
  };
  ASSERT_TRUE(spin(s, ready));

  auto serve_some = [&](int n) {
    std::set<std::string> indices;
    for (int i = 0; i < n; ++i) {
      Client c(ep, "r\n");
      EXPECT_TRUE(spin(s, [&] { return c.advance(); })) << "client " << i;
      indices.insert(c.field("w"));
    }
    return indices;
  };
  EXPECT_EQ(serve_some(4), (std::set<std::string>{"0", "1"}));

  const pid_t first = s.status()[0].pid;
  ASSERT_GT(first, 0);
  ::kill(first, SIGKILL);
  ASSERT_TRUE(spin(s, [&] { return s.status()[0].starts == 2 && s.status()[0].running; }));
  EXPECT_NE(s.status()[0].pid, first);
  ASSERT_TRUE(spin(s, ready));
  EXPECT_EQ(serve_some(4), (std::set<std::string>{"0", "1"}));
  EXPECT_TRUE(logged("killed by signal 9"));

  s.shutdown(5s);
  ASSERT_TRUE(spin(s, [&] { return s.finished(); }));
  EXPECT_TRUE(d.drained());
  // Both drained workers left on their own (status 0) before any signal was needed.
  int clean = 0;
  for (const auto& [at, e] : events_) {
    if (e.kind == SupervisorEvent::Kind::exited && e.exit_status == 0) ++clean;
  }
  EXPECT_EQ(clean, 2);
  EXPECT_EQ(count(SupervisorEvent::Kind::killed), 0);
  EXPECT_EQ(count(SupervisorEvent::Kind::stopped), 1);
  EXPECT_EQ(events_.back().second.kind, SupervisorEvent::Kind::stopped);
  test::expect_accounted(d);
}

TEST_F(SupervisorTest, R13_WorkerCutOffByTheDispatcherIsTerminatedAndRestarted) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const Endpoint ep = local_endpoint(listener.borrow());
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  Supervisor s(d, options(helper_argv("sup_garbage"), 1));
  record(s);
  s.start();
  ASSERT_TRUE(spin(s, [&] { return d.workers().size() == 1; }));
  Client c(ep, "r\n");
  ASSERT_TRUE(spin(s, [&] { return count(SupervisorEvent::Kind::started) >= 2; }));
  EXPECT_EQ(d.stats().worker_protocol_errors, 1u);
  bool terminated = false;
  for (const auto& [at, e] : events_) {
    if (e.kind == SupervisorEvent::Kind::exited) terminated = e.exit_status == 128 + SIGTERM;
  }
  EXPECT_TRUE(terminated);
  EXPECT_TRUE(logged("cut off"));
}

TEST_F(SupervisorTest, S6_InheritModeSharedListenerBySystemdConvention) {
  auto o = options(helper_argv("sup_inherit"), 2);
  o.mode = WorkerMode::inherit;
  o.listeners.push_back({.name = "web", .endpoint = parse_endpoint("127.0.0.1:0")});
  Dispatcher d;
  Supervisor s(d, std::move(o));
  record(s);
  s.start();
  // The supervisor's own environment never carries LISTEN_* for other children.
  EXPECT_EQ(std::getenv("LISTEN_FDS"), nullptr);
  EXPECT_EQ(std::getenv("LISTEN_PID"), nullptr);
  const Endpoint ep = s.listener_endpoints().at(0);
  ASSERT_NE(ep.port, 0);
  std::set<std::string> pids;
  for (const auto& w : s.status()) pids.insert(std::to_string(w.pid));
  for (int i = 0; i < 6; ++i) {
    Client c(ep, "");
    ASSERT_TRUE(spin(s, [&] { return c.advance(); }));
    EXPECT_EQ(c.field("listen_pid"), c.field("pid")) << c.reply();
    EXPECT_EQ(pids.count(c.field("pid")), 1u) << c.reply();
    EXPECT_EQ(c.field("fds"), "1");
    EXPECT_EQ(c.field("names"), "web");
    EXPECT_EQ(c.field("fd3"), "tcp4_listener");
    EXPECT_EQ(c.field("fd4"), "closed");  // nothing else leaked into the worker
    EXPECT_EQ(c.field("blocking"), "yes");  // as systemd passes listeners
  }
  s.shutdown(5s);
  ASSERT_TRUE(spin(s, [&] { return s.finished(); }));
  for (const auto& [at, e] : events_) {
    if (e.kind == SupervisorEvent::Kind::exited) {
      EXPECT_EQ(e.exit_status, 128 + SIGTERM);
    }
  }
}

// Two generations on one dispatcher and one listener: retiring the first stops only its
// workers, the second keeps serving on the same socket, and the second generation's start
// left the shared O_NONBLOCK flag as the first one's workers had set it (R14).
TEST_F(SupervisorTest, R22_RetiredGenerationStopsWhileTheNextServesTheSameListener) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const Endpoint ep = local_endpoint(listener.borrow());
  Dispatcher d;
  auto first_options = options(helper_argv("sup_inherit"), 2);
  first_options.mode = WorkerMode::inherit;
  first_options.listeners.push_back(
      {.name = "web", .socket = Fd(::fcntl(listener.get(), F_DUPFD_CLOEXEC, 3)), .endpoint = ep});
  Supervisor first(d, std::move(first_options));
  first.start();
  set_nonblocking(listener.borrow(), true);  // as a worker that polls would
  auto second_options = options(helper_argv("sup_inherit"), 2);
  second_options.mode = WorkerMode::inherit;
  second_options.set_listeners_blocking = false;
  second_options.listeners.push_back(
      {.name = "web", .socket = Fd(::fcntl(listener.get(), F_DUPFD_CLOEXEC, 3)), .endpoint = ep});
  Supervisor second(d, std::move(second_options));
  record(second);
  second.start();
  EXPECT_NE(::fcntl(listener.get(), F_GETFL) & O_NONBLOCK, 0);
  std::set<std::string> second_pids;
  for (const auto& w : second.status()) second_pids.insert(std::to_string(w.pid));
  first.retire(5s);
  ASSERT_TRUE(spin(second, [&] { return first.finished(); }));
  EXPECT_FALSE(second.finished());
  for (int i = 0; i < 6; ++i) {
    Client c(ep, "");
    ASSERT_TRUE(spin(second, [&] { return c.advance(); }));
    EXPECT_EQ(second_pids.count(c.field("pid")), 1u) << c.reply();
  }
  EXPECT_EQ(count(SupervisorEvent::Kind::exited), 0);  // the retirement touched only the first
  second.shutdown(5s);
  ASSERT_TRUE(spin(second, [&] { return second.finished(); }));
}

TEST_F(SupervisorTest, S6_InheritModeOneReusePortListenerPerWorker) {
  auto o = options(helper_argv("sup_inherit"), 2);
  o.mode = WorkerMode::inherit;
  o.reuse_port_per_worker = true;
  o.listeners.push_back({.name = "api", .endpoint = parse_endpoint("127.0.0.1:0")});
  Dispatcher d;
  Supervisor s(d, std::move(o));
  s.start();
  const Endpoint ep = s.listener_endpoints().at(0);
  std::set<std::string> served_by;
  for (int i = 0; i < 24; ++i) {
    Client c(ep, "");
    ASSERT_TRUE(spin(s, [&] { return c.advance(); }));
    EXPECT_EQ(c.field("listen_pid"), c.field("pid"));
    EXPECT_EQ(c.field("names"), "api");
    EXPECT_EQ(c.field("blocking"), "yes");
    served_by.insert(c.field("index"));
  }
  // The kernel spreads connections over the group by a hash of the 4-tuple; 24 clients
  // from distinct source ports all landing on one of two listeners is a 2^-23 event.
  EXPECT_EQ(served_by.size(), 2u);
  s.shutdown(5s);
  ASSERT_TRUE(spin(s, [&] { return s.finished(); }));
}

TEST_F(SupervisorTest, S6_ReusePortListenersOfEveryWorkerDeferAcceptLikeTheFirst) {
  // The first listener of the group comes from the caller (here with TCP_DEFER_ACCEPT, as
  // systemd's DeferAcceptSec= would set it); the supervisor opens the others and must
  // configure them alike, or a client's handling would depend on the worker it lands on.
  auto o = options(helper_argv("sup_inherit"), 2);
  o.mode = WorkerMode::inherit;
  o.reuse_port_per_worker = true;
  Fd first = listen_on(parse_endpoint("127.0.0.1:0"),
                       {.reuse_port = true, .defer_accept = std::chrono::seconds{1}});
  ASSERT_EQ(defer_accept_of(first.borrow()).count(), 1);
  const Endpoint bound = local_endpoint(first.borrow());
  o.listeners.push_back({.name = "api", .socket = std::move(first), .endpoint = bound});
  Dispatcher d;
  Supervisor s(d, std::move(o));
  s.start();
  const Endpoint ep = s.listener_endpoints().at(0);
  std::set<std::string> served_by;
  for (int i = 0; i < 24; ++i) {
    Client c(ep, "x");  // deferred: accept() returns a connection once data arrived
    ASSERT_TRUE(spin(s, [&] { return c.advance(); }));
    EXPECT_EQ(c.field("defer"), "1") << c.reply();
    served_by.insert(c.field("index"));
  }
  EXPECT_EQ(served_by.size(), 2u);  // both workers' listeners were seen (2^-23 otherwise)
  s.shutdown(5s);
  ASSERT_TRUE(spin(s, [&] { return s.finished(); }));
}

TEST_F(SupervisorTest, S6_ShutdownKillsWorkersThatIgnoreTheDeadline) {
  Dispatcher d;
  auto o = options(helper_argv("sup_inherit", {"ignore-term"}), 1);
  o.mode = WorkerMode::inherit;
  o.listeners.push_back({.name = "x", .endpoint = parse_endpoint("127.0.0.1:0")});
  Supervisor s(d, std::move(o));
  record(s);
  s.start();
  // An answer means SIGTERM is already ignored.
  Client c(s.listener_endpoints().at(0), "");
  ASSERT_TRUE(spin(s, [&] { return c.advance(); }));
  const auto begin = std::chrono::steady_clock::now();
  s.shutdown(300ms);
  ASSERT_TRUE(spin(s, [&] { return s.finished(); }, 5s));
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 290ms);
  EXPECT_EQ(count(SupervisorEvent::Kind::killed), 1);
  EXPECT_EQ(s.status()[0].last_exit_status, 128 + SIGKILL);
}

TEST_F(SupervisorTest, S6_BadCommandIsReportedAtStart) {
  Dispatcher d;
  Supervisor s(d, options({"sockshare-no-such-program-xyz"}, 1));
  try {
    s.start();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_input);
  }
}

}  // namespace
}  // namespace sockshare
