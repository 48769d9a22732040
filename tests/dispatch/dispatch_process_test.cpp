// The dispatcher with worker processes: policies, a worker killed with connections in flight,
// a stuck worker, a worker that writes garbage, accept() at EMFILE (R21).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <set>

#include "dispatch_support.hpp"
#include "linux/sys.hpp"
#include "sockshare/dispatch.hpp"

namespace sockshare::dispatch {
namespace {

using test::Child;
using test::Client;
using test::pump;
using namespace std::chrono_literals;

// A worker process. Modes:
//   serve   : answer each connection with one line and close it
//   hold    : answer, keep the connection open, report the held count as load
//   stuck   : say hello, then never read the channel
//   garbage : say hello, wait for a connection batch, write garbage instead of an ack
SOCKSHARE_HELPER(disp_worker) {
  const std::string mode = ctx.args().at(0);
  Worker worker = Worker::from_environment();
  if (mode == "limited") {
    // Room for 4 more descriptors only: a batch of 20 arrives truncated (R9).
    const auto open = test::open_fds();
    rlimit lim{};
    ::getrlimit(RLIMIT_NOFILE, &lim);
    lim.rlim_cur = static_cast<rlim_t>(*open.rbegin() + 1 + 4);
    if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) return 10;
  }
  ctx.ready();
  if (mode == "stuck") {
    for (;;) ::pause();
  }
  if (mode == "garbage") {
    sys::wait_ready(worker.native_handle().get(), POLLIN, sys::kNoDeadline);
    const char junk[] = "\x01\x02garbage, not a sockshare header";
    if (::send(worker.native_handle().get(), junk, sizeof junk, MSG_NOSIGNAL) < 0) return 3;
    for (;;) ::pause();
  }
  std::vector<Connection> held;
  std::vector<Connection> got;
  for (;;) {
    got.clear();
    const bool more = worker.wait(got);
    for (auto& c : got) {
      if (mode == "hold") {
        const std::string request = test::read_request(c);
        held.push_back(std::move(c));
        // Reported before the reply, so the dispatcher knows before the client does.
        worker.report_load(static_cast<std::uint32_t>(held.size()));
        test::write_all(held.back().socket, test::reply_line(held.back(), worker.index(), request));
      } else {
        test::serve(c, worker.index());
      }
    }
    if (!more) return 0;
  }
}

class DispatchProcess : public test::FdLeakTest {
protected:
  void SetUp() override {
    test::FdLeakTest::SetUp();
    Fd fd = listen_on(parse_endpoint("127.0.0.1:0"));
    endpoint_ = local_endpoint(fd.borrow());
    listener_ = std::move(fd);
  }

  Child spawn_worker(Dispatcher& d, std::uint32_t index, const std::string& mode) {
    auto [ours, theirs] = Channel::pair();
    Child child = Child::helper("disp_worker", {.args = {mode},
                                                .inherit = {theirs.native_handle()},
                                                .env = {std::string(kChannelFdEnv) + "=3",
                                                        std::string(kWorkerIndexEnv) + "=" +
                                                            std::to_string(index)}});
    EXPECT_EQ(child.wait_ready(), "ready");
    d.add_worker(std::move(ours), child.pid(), index);
    return child;
  }

  // Sequential clients: each one finishes before the next connects.
  std::vector<Client> sequential(Dispatcher& d, int n, const char* source = nullptr) {
    std::vector<Client> done;
    for (int i = 0; i < n; ++i) {
      done.emplace_back(endpoint_, "req" + std::to_string(i) + "\n", source);
      EXPECT_TRUE(pump(d, [&] { return done.back().advance(); })) << "client " << i;
    }
    return done;
  }

  Fd listener_;
  Endpoint endpoint_;
};

TEST_F(DispatchProcess, S6_RoundRobinAlternatesBetweenWorkers) {
  Dispatcher d({.policy = Policy::round_robin});
  d.add_listener("web", std::move(listener_));
  Child w0 = spawn_worker(d, 0, "serve");
  Child w1 = spawn_worker(d, 1, "serve");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  auto clients = sequential(d, 8);
  for (std::size_t i = 1; i < clients.size(); ++i) {
    EXPECT_NE(clients[i].field("w"), clients[i - 1].field("w")) << "client " << i;
  }
  auto by = test::count_by(clients, "w");
  EXPECT_EQ(by["0"], 4);
  EXPECT_EQ(by["1"], 4);
  EXPECT_EQ(test::count_by(clients, "pid").size(), 2u);
  ASSERT_TRUE(pump(d, [&] { return d.stats().in_flight == 0; }));
  test::expect_accounted(d);
}

TEST_F(DispatchProcess, S6_LeastLoadedPrefersTheIdleWorker) {
  Dispatcher d({.policy = Policy::least_loaded});
  d.add_listener("web", std::move(listener_));
  Child busy = spawn_worker(d, 0, "hold");
  Child idle = spawn_worker(d, 1, "serve");
  auto clients = sequential(d, 8);
  auto by = test::count_by(clients, "w");
  // The holding worker takes at most the first connection (a tie); after that it reports a
  // load of 1 and every other connection goes to the idle one. Round robin would give 4/4.
  EXPECT_LE(by["0"], 1);
  EXPECT_GE(by["1"], 7);
}

TEST_F(DispatchProcess, S6_ClientHashKeepsEachClientAddressOnOneWorker) {
  Dispatcher d({.policy = Policy::client_hash});
  d.add_listener("web", std::move(listener_));
  std::vector<Child> workers;
  for (std::uint32_t i = 0; i < 3; ++i) workers.push_back(spawn_worker(d, i, "serve"));
  std::map<std::string, std::string> owner;  // source address -> worker index
  std::set<std::string> used;
  for (int host = 2; host <= 9; ++host) {
    const std::string source = "127.0.0." + std::to_string(host);
    auto clients = sequential(d, 3, source.c_str());
    for (auto& c : clients) {
      EXPECT_TRUE(c.field("peer").starts_with(source + ":")) << c.field("peer");
      EXPECT_EQ(c.field("w"), clients[0].field("w")) << "client " << source << " moved";
    }
    owner[source] = clients[0].field("w");
    used.insert(clients[0].field("w"));
  }
  EXPECT_GE(used.size(), 2u) << "eight addresses all hashed to one of three workers";

  // Sticky across a restart: the replacement with the same index gets the same clients.
  const std::string victim = owner["127.0.0.2"];
  const std::uint32_t index = static_cast<std::uint32_t>(std::stoul(victim));
  workers[index].kill(SIGKILL);
  workers[index].wait_exit();
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  workers[index] = spawn_worker(d, index, "serve");
  for (int host = 2; host <= 9; ++host) {
    const std::string source = "127.0.0." + std::to_string(host);
    auto clients = sequential(d, 1, source.c_str());
    EXPECT_EQ(clients[0].field("w"), owner[source]) << source;
  }
}

TEST_F(DispatchProcess, S6_CustomPolicyDecides) {
  std::vector<std::string> seen_listeners;
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = [&](const ConnectionInfo& info, std::span<const WorkerView> candidates) {
                  seen_listeners.push_back(info.listener);
                  for (std::size_t i = 0; i < candidates.size(); ++i) {
                    if (candidates[i].index == 1) return i;
                  }
                  return std::size_t{0};
                }});
  d.add_listener("api", std::move(listener_));
  Child w0 = spawn_worker(d, 0, "serve");
  Child w1 = spawn_worker(d, 1, "serve");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  auto clients = sequential(d, 5);
  for (auto& c : clients) EXPECT_EQ(c.field("w"), "1");
  EXPECT_EQ(seen_listeners, std::vector<std::string>(5, "api"));
}

TEST_F(DispatchProcess, R12_KillNineOfAWorkerLosesNoUnacknowledgedConnection) {
  Dispatcher d({.policy = Policy::round_robin, .ack_timeout = 60s});
  d.add_listener("web", std::move(listener_));
  Child good = spawn_worker(d, 0, "serve");
  Child doomed = spawn_worker(d, 1, "stuck");  // receives nothing it acknowledges
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  constexpr int kClients = 40;
  std::vector<Client> clients;
  for (int i = 0; i < kClients; ++i) clients.emplace_back(endpoint_, "r" + std::to_string(i) + "\n");
  auto in_flight_of = [&](std::uint32_t index) {
    for (const auto& w : d.workers()) {
      if (w.index == index) return w.in_flight;
    }
    return 0u;
  };
  // Everything dispatched, and the live worker has acknowledged all of its share.
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == kClients && in_flight_of(0) == 0; }));
  const std::uint32_t held_by_doomed = in_flight_of(1);
  ASSERT_GT(held_by_doomed, 0u);
  doomed.kill(SIGKILL);
  EXPECT_EQ(doomed.wait_exit(), 128 + SIGKILL);
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  for (auto& c : clients) {
    EXPECT_FALSE(c.reset());
    EXPECT_EQ(c.field("w"), "0");
  }
  ASSERT_TRUE(pump(d, [&] { return d.stats().in_flight == 0; }));
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.accepted, static_cast<std::uint64_t>(kClients));
  EXPECT_EQ(s.redispatched, held_by_doomed);
  EXPECT_EQ(s.dispatched, kClients + held_by_doomed);
  EXPECT_EQ(s.dropped, 0u);
  EXPECT_EQ(s.workers_lost, 1u);
  test::expect_accounted(d);
}

TEST_F(DispatchProcess, R12_KillNineUnderLoadEveryClientServedOrAccounted) {
  Dispatcher d({.policy = Policy::round_robin});
  d.add_listener("web", std::move(listener_));
  Child w0 = spawn_worker(d, 0, "serve");
  Child w1 = spawn_worker(d, 1, "serve");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  constexpr int kClients = 60;
  std::vector<Client> clients;
  bool killed = false;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back(endpoint_, "r" + std::to_string(i) + "\n");
    d.run_once(0ms);
    if (i == kClients / 2) {
      w1.kill(SIGKILL);
      killed = true;
    }
  }
  ASSERT_TRUE(killed);
  EXPECT_EQ(w1.wait_exit(), 128 + SIGKILL);
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients) && d.stats().in_flight == 0; }));
  int served = 0;
  int lost = 0;
  for (auto& c : clients) {
    if (c.has_line()) ++served;
    else ++lost;  // acknowledged by the killed worker, then never answered
  }
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(served + lost, kClients);
  EXPECT_EQ(s.accepted, static_cast<std::uint64_t>(kClients));
  EXPECT_EQ(s.dropped, 0u);
  test::expect_accounted(d);
  // Unanswered clients can only be ones the dead worker had acknowledged (it owned them);
  // every client sent to the live worker, first or re-dispatched, was answered.
  EXPECT_EQ(s.acknowledged, static_cast<std::uint64_t>(kClients));
  auto by = test::count_by(clients, "w");
  EXPECT_GE(by["0"], kClients / 2 - 1);
  EXPECT_EQ(by["0"] + by["1"], served);
}

TEST_F(DispatchProcess, R10_AStuckWorkerDoesNotHoldUpTheOthers) {
  Dispatcher d({.policy = Policy::round_robin, .max_in_flight = 4, .ack_timeout = 60s});
  d.add_listener("web", std::move(listener_));
  Child good = spawn_worker(d, 0, "serve");
  Child stuck = spawn_worker(d, 1, "stuck");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  std::vector<Client> clients;
  for (int i = 0; i < 24; ++i) clients.emplace_back(endpoint_, "r\n");
  auto answered = [&] {
    int n = 0;
    for (auto& c : clients) n += c.advance() ? 1 : 0;
    return n;
  };
  // Only the stuck worker's quota of 4 waits; the live worker answers the other 20.
  ASSERT_TRUE(pump(d, [&] { return answered() == 20 && d.stats().in_flight == 4; }));
  for (int i = 0; i < 20; ++i) d.run_once(1ms);
  EXPECT_EQ(answered(), 20);
  stuck.kill(SIGKILL);
  ASSERT_TRUE(pump(d, [&] { return answered() == 24; }));
  test::expect_accounted(d);
}

TEST_F(DispatchProcess, R13_AWorkerWritingGarbageIsCutOffWithoutHarm) {
  Dispatcher d({.policy = Policy::round_robin});
  int lost_callbacks = 0;
  d.on_worker_lost = [&](WorkerId, pid_t) { ++lost_callbacks; };
  d.add_listener("web", std::move(listener_));
  Child good = spawn_worker(d, 0, "serve");
  Child bad = spawn_worker(d, 1, "garbage");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  std::vector<Client> clients;
  for (int i = 0; i < 10; ++i) clients.emplace_back(endpoint_, "r\n");
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  for (auto& c : clients) EXPECT_EQ(c.field("w"), "0");
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.worker_protocol_errors, 1u);
  EXPECT_EQ(lost_callbacks, 1);
  EXPECT_GE(s.redispatched, 1u);
  EXPECT_EQ(d.workers().size(), 1u);
  ASSERT_TRUE(pump(d, [&] { return d.stats().in_flight == 0; }));
  test::expect_accounted(d);
}

TEST_F(DispatchProcess, R9_WorkerAtItsDescriptorLimitRejectsTheBatchAndNothingIsLost) {
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = [](const ConnectionInfo&, std::span<const WorkerView> c) {
                  for (std::size_t i = 0; i < c.size(); ++i) {
                    if (c[i].index == 0) return i;  // the limited worker whenever it is there
                  }
                  return std::size_t{0};
                },
                .accept_batch = 64});
  d.add_listener("web", std::move(listener_));
  Child limited = spawn_worker(d, 0, "limited");
  Child roomy = spawn_worker(d, 1, "serve");
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2; }));
  std::vector<Client> clients;
  for (int i = 0; i < 20; ++i) clients.emplace_back(endpoint_, "r\n");
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  for (auto& c : clients) {
    EXPECT_FALSE(c.reset());
    EXPECT_EQ(c.field("w"), "1");
  }
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_GE(s.rejected_batches, 1u);
  EXPECT_EQ(s.redispatched, 20u);
  EXPECT_EQ(s.workers_lost, 0u);
  test::expect_accounted(d);
}

// R21: a dispatcher at RLIMIT_NOFILE with clients waiting. It must neither spin on accept()
// nor lose them: once descriptors free up, every one is served. Runs in a child process so
// the lowered limit touches nothing else. The worker is in the same process (a Worker on
// the other end of a channel pair) to keep the descriptor budget exact.
std::atomic<int> g_accept_calls{0};
int counting_accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  g_accept_calls.fetch_add(1, std::memory_order_relaxed);
  return ::accept4(fd, addr, len, flags);
}

SOCKSHARE_HELPER(emfile_dispatcher) {
  sys::seam().accept4 = counting_accept4;
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const auto port = local_endpoint(listener.borrow()).port;
  Dispatcher d({.emfile_backoff = 20ms});
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);
  d.run_once(10ms);  // the hello

  // Use up every descriptor below a lowered limit.
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = 64;
  if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) return 10;
  std::vector<Fd> filler;
  for (;;) {
    Fd f(::fcntl(0, F_DUPFD_CLOEXEC, 0));
    if (!f.valid()) break;
    filler.push_back(std::move(f));
  }
  ctx.ready("port " + std::to_string(port));
  // The parent connects 3 clients now; give it the time to do so, looping without sleeping.
  const auto start = std::chrono::steady_clock::now();
  while (d.stats().emfile_events == 0 && std::chrono::steady_clock::now() - start < 5s) d.run_once(5ms);
  const int calls_at_first_emfile = g_accept_calls.load();
  const auto stalled = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - stalled < 300ms) d.run_once(5ms);
  const int calls_while_stalled = g_accept_calls.load() - calls_at_first_emfile;
  filler.clear();  // descriptors free again: the waiting clients must all be served
  std::vector<Connection> got;
  std::size_t served = 0;
  const auto resume = std::chrono::steady_clock::now();
  while (served < 3 && std::chrono::steady_clock::now() - resume < 10s) {
    d.run_once(5ms);
    got.clear();
    worker.poll(got);
    for (auto& c : got) test::serve(c, 0);
    served += got.size();
  }
  test::settle(d);
  const Stats s = d.stats();
  ctx.ready("emfile=" + std::to_string(s.emfile_events) + " stalled_calls=" +
            std::to_string(calls_while_stalled) + " served=" + std::to_string(served) +
            " accepted=" + std::to_string(s.accepted));
  return 0;
}

class DispatchEmfile : public test::FdLeakTest {};

TEST_F(DispatchEmfile, R21_AcceptAtEmfileBacksOffAndServesLater) {
  Child child = Child::helper("emfile_dispatcher");
  const std::string port_line = child.wait_ready();
  ASSERT_TRUE(port_line.starts_with("port ")) << port_line;
  const Endpoint ep = parse_endpoint("127.0.0.1:" + port_line.substr(5));
  std::vector<Client> clients;
  for (int i = 0; i < 3; ++i) clients.emplace_back(ep, "r\n");
  const std::string result = child.wait_ready(std::chrono::seconds(20));
  EXPECT_EQ(child.wait_exit(), 0);
  auto value = [&](const std::string& key) {
    auto at = result.find(key + "=");
    return at == std::string::npos ? -1 : std::stoi(result.substr(at + key.size() + 1));
  };
  EXPECT_GE(value("emfile"), 1) << result;
  // 300 ms at EMFILE with a 20 ms backoff doubling to 1 s: a handful of attempts, not a spin.
  EXPECT_LE(value("stalled_calls"), 8) << result;
  EXPECT_EQ(value("served"), 3) << result;
  EXPECT_EQ(value("accepted"), 3) << result;
  // The child served them before it reported: the replies are already here.
  for (auto& c : clients) {
    EXPECT_TRUE(c.advance());
    EXPECT_EQ(c.field("w"), "0");
  }
}

}  // namespace
}  // namespace sockshare::dispatch
