// Generations of `sockshare serve`: reload (SIGHUP and `sockshare reload`), a new generation
// that fails to start, back-to-back reloads while an old generation drains, socket
// activation of serve itself with sd_notify. The real binary, real HTTP over loopback;
// readiness and reload outcomes come as lines on `--ready-fd`, process exits through pidfds:
// no sleeps, every wait and every load loop bounded.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"
#include "support/harness.hpp"

namespace sockshare::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const std::string kCli = SOCKSHARE_CLI_PATH;

int remaining_ms(Clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// ---- a tiny HTTP client --------------------------------------------------------------------

enum class Outcome { ok, refused, reset, other_error, bad_status };

struct Reply {
  Outcome outcome = Outcome::other_error;
  int status = 0;
  int pid = 0;  // from the built-in worker's body "worker N pid P"
  std::string body;
  int error = 0;
};

// One request on a new connection to `address` (a sockaddr_in or sockaddr_un).
Reply http_request(int family, const sockaddr* address, socklen_t length, const std::string& path) {
  Reply reply;
  Fd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    reply.error = errno;
    return reply;
  }
  if (sys::retry_eintr([&] { return ::connect(fd.get(), address, length); }) != 0) {
    reply.error = errno;
    reply.outcome = errno == ECONNREFUSED ? Outcome::refused : Outcome::other_error;
    return reply;
  }
  const std::string request =
      "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (sys::retry_eintr([&] {
        return ::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL);
      }) != static_cast<ssize_t>(request.size())) {
    reply.error = errno;
    reply.outcome = errno == ECONNRESET || errno == EPIPE ? Outcome::reset : Outcome::other_error;
    return reply;
  }
  std::string data;
  const auto deadline = Clock::now() + 10s;
  char buf[2048];
  for (;;) {
    pollfd p{fd.get(), POLLIN, 0};
    if (sys::retry_eintr([&] { return ::poll(&p, 1, remaining_ms(deadline)); }) <= 0) {
      reply.error = ETIMEDOUT;
      return reply;
    }
    const ssize_t n = sys::retry_eintr([&] { return ::read(fd.get(), buf, sizeof buf); });
    if (n < 0) {
      reply.error = errno;
      reply.outcome = errno == ECONNRESET ? Outcome::reset : Outcome::other_error;
      return reply;
    }
    if (n == 0) break;
    data.append(buf, static_cast<std::size_t>(n));
  }
  if (data.size() < 12 || !data.starts_with("HTTP/1.1 ")) {
    reply.outcome = data.empty() ? Outcome::reset : Outcome::other_error;
    return reply;
  }
  reply.status = std::stoi(data.substr(9, 3));
  const auto body_at = data.find("\r\n\r\n");
  if (body_at != std::string::npos) reply.body = data.substr(body_at + 4);
  int index = -1;
  std::sscanf(reply.body.c_str(), "worker %d pid %d", &index, &reply.pid);
  reply.outcome = reply.status == 200 ? Outcome::ok : Outcome::bad_status;
  return reply;
}

Reply http_get(std::uint16_t port, const std::string& path = "/") {
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
  return http_request(AF_INET, reinterpret_cast<sockaddr*>(&sin), sizeof sin, path);
}

Reply http_get_unix(const std::string& socket_path, const std::string& path = "/") {
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof sun.sun_path) return {};
  std::memcpy(sun.sun_path, socket_path.data(), socket_path.size());
  return http_request(AF_UNIX, reinterpret_cast<sockaddr*>(&sun), sizeof sun, path);
}

std::set<int> parse_pids(std::string_view list) {
  std::set<int> pids;
  while (!list.empty()) {
    const auto comma = list.find(',');
    pids.insert(std::stoi(std::string(list.substr(0, comma))));
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return pids;
}

// Waits (bounded) until every process in `pids` has exited: a pidfd turns readable then, so
// there is nothing to sleep on. Processes that are already gone count as exited.
bool wait_gone(const std::set<int>& pids, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (int pid : pids) {
    Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd.valid()) continue;  // ESRCH: gone already
    pollfd p{pidfd.get(), POLLIN, 0};
    if (sys::retry_eintr([&] { return ::poll(&p, 1, remaining_ms(deadline)); }) != 1) return false;
  }
  return true;
}

// ---- a running `sockshare serve` -----------------------------------------------------------

struct Serve {
  Child child;
  std::uint16_t port = 0;
  std::string control;
  std::set<int> pids;  // of the serving generation, as announced

  Serve() = default;
  Serve(Serve&&) = default;
  Serve& operator=(Serve&&) = default;
  ~Serve() {
    if (child.running()) {
      child.kill(SIGTERM);
      child.wait_exit(20s);
    }
  }

  // Reads readiness lines up to "ready". `ready_fd`: where the harness put the pipe.
  void read_start() {
    for (int i = 0; i < 32; ++i) {
      const std::string line = child.wait_ready(20s);
      if (line.empty() || line == "ready") break;
      if (line.starts_with("listening ") && port == 0) {
        port = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
      } else if (line.starts_with("control ")) {
        control = line.substr(8);
      } else if (line.starts_with("generation 1 pids ")) {
        pids = parse_pids(std::string_view(line).substr(18));
      }
    }
  }

  static Serve start(std::vector<std::string> args) {
    Serve s;
    std::vector<std::string> argv = {kCli, "serve", "--ready-fd", "3"};
    argv.insert(argv.end(), args.begin(), args.end());
    s.child = Child::program(argv);
    s.read_start();
    return s;
  }

  // The next reload outcome line: "reloaded generation K pids a,b" (pids updated, returns
  // true) or "reload-failed generation K serving J" (false).
  bool next_reload(std::uint32_t expected_generation) {
    const std::string line = child.wait_ready(20s);
    const std::string ok = "reloaded generation " + std::to_string(expected_generation) + " pids ";
    if (line.starts_with(ok)) {
      pids = parse_pids(std::string_view(line).substr(ok.size()));
      return true;
    }
    EXPECT_TRUE(line.starts_with("reload-failed generation " + std::to_string(expected_generation)))
        << line;
    return false;
  }
};

// Requests in a loop on a thread, each on a new connection, until stopped or bounded out.
class Load {
 public:
  explicit Load(std::uint16_t port) : port_(port) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Load() { stop(); }
  void stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  std::size_t count() const { return total_.load(); }
  // Blocks until `more` further requests completed (bounded), so the load really overlaps
  // what the test does next.
  bool wait_for(std::size_t more, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::size_t target = total_.load() + more;
    return progress_.wait_for(lock, timeout, [&] { return total_.load() >= target; });
  }
  std::map<Outcome, std::size_t> outcomes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return outcomes_;
  }
  std::string first_failure() {
    std::lock_guard<std::mutex> lock(mutex_);
    return first_failure_;
  }

 private:
  void loop() {
    const auto deadline = Clock::now() + 25s;
    for (std::size_t i = 0; i < 50000 && !stop_.load() && Clock::now() < deadline; ++i) {
      const Reply r = http_get(port_);
      std::lock_guard<std::mutex> lock(mutex_);
      ++outcomes_[r.outcome];
      if (r.outcome != Outcome::ok && first_failure_.empty()) {
        first_failure_ = "request " + std::to_string(i) + ": outcome " +
                         std::to_string(static_cast<int>(r.outcome)) + " status " +
                         std::to_string(r.status) + " errno " + std::to_string(r.error);
      }
      ++total_;
      progress_.notify_all();
    }
  }

  std::uint16_t port_;
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> total_{0};
  std::mutex mutex_;
  std::condition_variable progress_;
  std::map<Outcome, std::size_t> outcomes_;
  std::string first_failure_;
  std::thread thread_;
};

// `sockshare status` without a process: the control protocol (docs/SERVE.md) on a channel.
std::string status_report(const std::string& control) {
  Channel channel = Channel::connect(parse_endpoint(control), 5s);
  const std::string_view format = "text";
  channel.send({.type = 0x8301, .payload = std::as_bytes(std::span(format.data(), format.size()))},
               5s);
  ReceiveOptions options;
  options.max_fds = 0;
  const Message reply = channel.receive(options, 5s);
  return std::string(reply.payload_text());
}

class Generations : public FdLeakTest {};

// After a reload: once the old generation's workers are gone, every request is answered by
// the new generation.
void expect_served_by(Serve& serve, const std::set<int>& old_pids) {
  ASSERT_TRUE(wait_gone(old_pids, 20s)) << "the old generation did not exit";
  for (int i = 0; i < 4; ++i) {
    const Reply r = http_get(serve.port);
    ASSERT_EQ(r.outcome, Outcome::ok) << r.body;
    EXPECT_EQ(serve.pids.count(r.pid), 1U)
        << "served by pid " << r.pid << ", not the new generation";
  }
}

void reload_under_load(const std::vector<std::string>& args) {
  Serve serve = Serve::start(args);
  ASSERT_NE(serve.port, 0);
  ASSERT_EQ(serve.pids.size(), 2U);
  // Two clients, each a new connection per request, across five reloads.
  Load first_client(serve.port);
  Load second_client(serve.port);
  constexpr std::uint32_t kReloads = 5;
  for (std::uint32_t generation = 2; generation <= kReloads + 1; ++generation) {
    const std::set<int> old_pids = serve.pids;
    ASSERT_TRUE(first_client.wait_for(20)) << first_client.first_failure();
    serve.child.kill(SIGHUP);
    ASSERT_TRUE(serve.next_reload(generation));
    ASSERT_EQ(serve.pids.size(), 2U);
    for (int pid : serve.pids) EXPECT_EQ(old_pids.count(pid), 0U);
    expect_served_by(serve, old_pids);
  }
  ASSERT_TRUE(second_client.wait_for(20));
  for (Load* load : {&first_client, &second_client}) {
    load->stop();
    auto outcomes = load->outcomes();
    EXPECT_GE(load->count(), 20U * (kReloads + 1));
    EXPECT_EQ(outcomes[Outcome::ok], load->count()) << load->first_failure();
    EXPECT_EQ(outcomes[Outcome::refused], 0U);
    EXPECT_EQ(outcomes[Outcome::reset], 0U);
  }
  serve.child.kill(SIGTERM);
  EXPECT_EQ(serve.child.wait_exit(20s), 0);
}

TEST_F(Generations, R22_ReloadsUnderLoadDispatchModeLoseNothing) {
  reload_under_load({"--listen", "127.0.0.1:0", "--workers", "2"});
}

TEST_F(Generations, R22_ReloadsUnderLoadInheritModeLoseNothing) {
  reload_under_load({"--listen", "127.0.0.1:0", "--workers", "2", "--mode", "inherit"});
}

// haproxy #1883: a new generation that cannot start leaves the old one serving, and the
// reload says it failed; once the cause is gone the next reload succeeds.
TEST_F(Generations, FailedNewGenerationLeavesTheOldOneServing) {
  const std::string flag = "/tmp/sockshare-gen-test-fail-" + std::to_string(::getpid());
  ::unlink(flag.c_str());
  // The worker command refuses to start while the flag file exists (like a configuration
  // that no longer loads); otherwise it is the built-in worker.
  Serve serve =
      Serve::start({"--listen", "127.0.0.1:0", "--workers", "2", "--control",
                    "unix:@sockshare-gen-test-" + std::to_string(::getpid()), "--", "/bin/sh", "-c",
                    "test -e \"$1\" && exit 3; exec \"$0\" __worker", kCli, flag});
  ASSERT_NE(serve.port, 0);
  const std::set<int> first = serve.pids;
  ASSERT_EQ(first.size(), 2U);
  {
    Fd created(::open(flag.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
    ASSERT_TRUE(created.valid());
  }
  serve.child.kill(SIGHUP);
  EXPECT_FALSE(serve.next_reload(2));
  EXPECT_EQ(serve.pids, first);
  for (int i = 0; i < 4; ++i) {
    const Reply r = http_get(serve.port);
    ASSERT_EQ(r.outcome, Outcome::ok);
    EXPECT_EQ(first.count(r.pid), 1U) << r.pid;
  }
  // The same through the control socket: `sockshare reload` reports the failure (exit 1).
  {
    Child reload = Child::program({kCli, "reload", "--control", serve.control});
    EXPECT_EQ(reload.wait_exit(30s), 1);
    EXPECT_FALSE(serve.next_reload(3));
  }
  ::unlink(flag.c_str());
  {
    Child reload = Child::program({kCli, "reload", "--control", serve.control});
    EXPECT_EQ(reload.wait_exit(30s), 0);
    EXPECT_TRUE(serve.next_reload(4));
  }
  expect_served_by(serve, first);
  serve.child.kill(SIGTERM);
  EXPECT_EQ(serve.child.wait_exit(20s), 0);
}

// tableflip #52: reloads are accepted while an older generation still drains a long
// request; that request completes on the generation that accepted it.
TEST_F(Generations, BackToBackReloadsWhileAnOldGenerationDrains) {
  const std::string control = "unix:@sockshare-gen-test-b2b-" + std::to_string(::getpid());
  Serve serve = Serve::start({"--listen", "127.0.0.1:0", "--workers", "1", "--control", control});
  ASSERT_EQ(serve.pids.size(), 1U);
  const int first = *serve.pids.begin();
  // The request burns for 1.5 s in the only generation-1 worker, which reports a load of 1
  // to the dispatcher just before it starts burning: the status report shows when.
  Reply slow;
  std::thread burner([&] { slow = http_get(serve.port, "/burn?ms=1500"); });
  const auto until = Clock::now() + 10s;
  bool busy = false;
  for (int i = 0; i < 2000 && !busy && Clock::now() < until; ++i) {
    busy = status_report(control).find("load 1") != std::string::npos;
  }
  ASSERT_TRUE(busy) << status_report(control);
  std::set<int> replaced;  // generations 2 and 3: they had nothing to drain
  for (std::uint32_t generation = 2; generation <= 4; ++generation) {
    if (generation > 2) replaced.insert(serve.pids.begin(), serve.pids.end());
    serve.child.kill(SIGHUP);
    ASSERT_TRUE(serve.next_reload(generation));
  }
  // Every reload was taken while generation 1 still drained its request.
  const std::string report = status_report(control);
  EXPECT_NE(report.find("generation 1 draining"), std::string::npos) << report;
  EXPECT_NE(report.find("generation 4 serving"), std::string::npos) << report;
  // A worker told to drain may still take what the dispatcher handed it before it exits;
  // once generations 2 and 3 are gone, generation 4 serves.
  ASSERT_TRUE(wait_gone(replaced, 20s));
  const Reply now = http_get(serve.port);
  ASSERT_EQ(now.outcome, Outcome::ok);
  EXPECT_EQ(serve.pids.count(now.pid), 1U);
  burner.join();
  EXPECT_EQ(slow.outcome, Outcome::ok) << slow.body;
  EXPECT_EQ(slow.pid, first) << "the long request was not served by the first generation";
  serve.child.kill(SIGTERM);
  EXPECT_EQ(serve.child.wait_exit(20s), 0);
}

// ---- upgrade: a new serve process takes the listeners over -----------------------------------

Serve start_upgrade(const std::string& from, const std::string& control,
                    std::vector<std::string> extra = {}) {
  Serve s;
  std::vector<std::string> argv = {kCli, "serve",     "--ready-fd", "3",         "--upgrade-from",
                                   from, "--control", control,      "--workers", "2"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  s.child = Child::program(argv);
  return s;
}

void upgrade_under_load(const std::string& mode) {
  const std::string a = "unix:@sockshare-gen-test-up-a-" + std::to_string(::getpid());
  const std::string b = "unix:@sockshare-gen-test-up-b-" + std::to_string(::getpid());
  Serve first =
      Serve::start({"--listen", "127.0.0.1:0", "--workers", "2", "--control", a, "--mode", mode});
  ASSERT_NE(first.port, 0);
  Load load(first.port);
  ASSERT_TRUE(load.wait_for(20));
  Serve second = start_upgrade(a, b, {"--mode", mode});
  second.read_start();
  EXPECT_EQ(second.port, first.port) << "the new serve did not get the old one's listener";
  ASSERT_EQ(second.pids.size(), 2U);
  EXPECT_EQ(first.child.wait_ready(20s), "handed-over");
  EXPECT_EQ(first.child.wait_exit(20s), 0);
  expect_served_by(second, first.pids);
  ASSERT_TRUE(load.wait_for(20));
  load.stop();
  auto outcomes = load.outcomes();
  EXPECT_GE(load.count(), 4U);
  EXPECT_EQ(outcomes[Outcome::ok], load.count()) << load.first_failure();
  // The new serve reloads like any other.
  second.child.kill(SIGHUP);
  EXPECT_TRUE(second.next_reload(2));
  second.child.kill(SIGTERM);
  EXPECT_EQ(second.child.wait_exit(20s), 0);
}

TEST_F(Generations, R22_UpgradeUnderLoadDispatchModeHandsOverWithoutRefusals) {
  upgrade_under_load("dispatch");
}

TEST_F(Generations, R22_UpgradeUnderLoadInheritModeHandsOverWithoutRefusals) {
  upgrade_under_load("inherit");
}

// A new serve whose workers cannot start aborts the handoff and exits 1; the old serve never
// stopped accepting, and the next attempt is taken at once.
TEST_F(Generations, FailedUpgradeLeavesTheOldServeServing) {
  const std::string a = "unix:@sockshare-gen-test-upf-a-" + std::to_string(::getpid());
  const std::string b = "unix:@sockshare-gen-test-upf-b-" + std::to_string(::getpid());
  Serve first = Serve::start({"--listen", "127.0.0.1:0", "--workers", "2", "--control", a});
  ASSERT_NE(first.port, 0);
  {
    Serve broken = start_upgrade(a, b, {"--", "/bin/sh", "-c", "exit 3"});
    EXPECT_EQ(broken.child.wait_exit(20s), 1);
  }
  for (int i = 0; i < 4; ++i) {
    const Reply r = http_get(first.port);
    ASSERT_EQ(r.outcome, Outcome::ok);
    EXPECT_EQ(first.pids.count(r.pid), 1U);
  }
  Serve second = start_upgrade(a, b);
  second.read_start();
  EXPECT_EQ(second.port, first.port);
  EXPECT_EQ(first.child.wait_ready(20s), "handed-over");
  EXPECT_EQ(first.child.wait_exit(20s), 0);
  expect_served_by(second, first.pids);
}

// ---- socket activation of serve itself -------------------------------------------------------

struct NotifySocket {
  Fd fd;
  std::string name;  // "@..." as NOTIFY_SOCKET spells an abstract address

  NotifySocket() {
    name = "@sockshare-gen-test-notify-" + std::to_string(::getpid());
    fd = Fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path + 1, name.data() + 1, name.size() - 1);
    const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
    EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&sun), len), 0) << errno;
  }

  // Datagrams until one contains `wanted`; everything received, or empty on timeout.
  std::string wait_for(std::string_view wanted, std::chrono::milliseconds timeout = 20s) {
    const auto deadline = Clock::now() + timeout;
    std::string seen;
    while (true) {
      pollfd p{fd.get(), POLLIN, 0};
      if (sys::retry_eintr([&] { return ::poll(&p, 1, remaining_ms(deadline)); }) != 1) return {};
      char buf[4096];
      const ssize_t n = sys::retry_eintr([&] { return ::recv(fd.get(), buf, sizeof buf, 0); });
      if (n <= 0) return {};
      const std::string datagram(buf, static_cast<std::size_t>(n));
      seen += datagram + "\n";
      if (datagram.find(wanted) != std::string::npos) return seen;
    }
  }
};

TEST_F(Generations, ServeIsSocketActivatedAndSpeaksSdNotify) {
  Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(listener.valid());
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  ::inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&sin), sizeof sin), 0);
  ASSERT_EQ(::listen(listener.get(), 128), 0);
  socklen_t len = sizeof sin;
  ASSERT_EQ(::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&sin), &len), 0);
  const std::uint16_t port = ntohs(sin.sin_port);
  NotifySocket notify;

  // As systemd-socket-activate does: the listener at 3, LISTEN_PID = the pid of the process
  // that runs serve (exec keeps it), so the shell sets it just before exec. The harness's
  // readiness pipe lands at 4.
  SpawnOptions options;
  options.inherit = {listener.borrow()};
  options.env = {"LISTEN_FDS=1", "LISTEN_FDNAMES=web", "NOTIFY_SOCKET=" + notify.name};
  Serve serve;
  serve.child = Child::program({"/bin/sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", kCli, "serve",
                                "--ready-fd", "4", "--workers", "2"},
                               options);
  listener.reset();  // serve holds it now
  serve.read_start();
  EXPECT_EQ(serve.port, port) << "serve did not use the inherited listener";
  EXPECT_FALSE(notify.wait_for("READY=1").empty()) << "no READY=1 on NOTIFY_SOCKET";
  for (int i = 0; i < 4; ++i) {
    const Reply r = http_get(port);
    ASSERT_EQ(r.outcome, Outcome::ok);
    EXPECT_EQ(serve.pids.count(r.pid), 1U);
  }
  // A reload is announced as RELOADING=1, then READY=1 once the new generation serves.
  serve.child.kill(SIGHUP);
  const std::string reload = notify.wait_for("READY=1");
  EXPECT_NE(reload.find("RELOADING=1"), std::string::npos) << reload;
  ASSERT_TRUE(serve.next_reload(2));
  const Reply after = http_get(port);
  ASSERT_EQ(after.outcome, Outcome::ok);
  serve.child.kill(SIGTERM);
  EXPECT_FALSE(notify.wait_for("STOPPING=1").empty()) << "no STOPPING=1 on NOTIFY_SOCKET";
  EXPECT_EQ(serve.child.wait_exit(20s), 0);
}

// The real systemd-socket-activate, as a user tries serve without writing units: it binds a
// unix socket, waits for the first client, then execs serve with the socket as LISTEN_FDS
// (LISTEN_PID = its own pid, kept across exec). The client that triggered the start waits in
// the backlog meanwhile and must be served; so must the ones after, under the name given.
TEST_F(Generations, RealSystemdSocketActivateStartsServeOnTheFirstClient) {
  const std::string activate = "/usr/bin/systemd-socket-activate";
  ASSERT_EQ(::access(activate.c_str(), X_OK), 0)
      << activate << " is missing: scripts/deps.sh installs it (Debian package systemd)";
  char dir_template[] = "/tmp/sockshare-gen-test-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr) << errno;
  const std::string dir = dir_template;
  const std::string path = dir + "/web.sock";
  struct RemoveDir {
    std::string dir, path;
    ~RemoveDir() {
      ::unlink(path.c_str());
      ::rmdir(dir.c_str());
    }
  } remove_dir{dir, path};
  const std::string control = "unix:@sockshare-gen-test-ssa-" + std::to_string(::getpid());
  NotifySocket notify;
  // The tool closes every descriptor but its listeners before exec, the harness's readiness
  // pipe included: its stderr goes there instead, and carries "Listening on ..." (and, after
  // the exec, serve's log lines: a few per event, far below a pipe's capacity).
  Serve serve;
  serve.child = Child::program({"/bin/sh", "-c", "exec \"$0\" \"$@\" 2>&3", activate, "--listen",
                                path, "--fdname=web", "--setenv=NOTIFY_SOCKET=" + notify.name,
                                kCli, "serve", "--workers", "2", "--control", control});
  std::string line;
  for (int i = 0; i < 8 && !line.starts_with("Listening on"); ++i) {
    line = serve.child.wait_ready(20s);
    if (line.empty()) break;  // the tool exited or said nothing in time: wait_ready reported it
  }
  ASSERT_TRUE(line.starts_with("Listening on")) << line;

  const Reply first = http_get_unix(path);
  ASSERT_EQ(first.outcome, Outcome::ok) << "the client that started serve was not served";
  EXPECT_FALSE(notify.wait_for("READY=1").empty()) << "no READY=1 on NOTIFY_SOCKET";
  std::set<int> pids = {first.pid};
  for (int i = 0; i < 8; ++i) {
    const Reply r = http_get_unix(path);
    ASSERT_EQ(r.outcome, Outcome::ok) << "request " << i;
    pids.insert(r.pid);
  }
  EXPECT_EQ(pids.size(), 2U) << "least-loaded spreads idle connections over both workers";
  const std::string status = status_report(control);
  EXPECT_NE(status.find("listener web"), std::string::npos) << status;
  EXPECT_NE(status.find(path), std::string::npos) << status;

  serve.child.kill(SIGTERM);
  EXPECT_FALSE(notify.wait_for("STOPPING=1").empty()) << "no STOPPING=1 on NOTIFY_SOCKET";
  EXPECT_EQ(serve.child.wait_exit(20s), 0);
}

// sd-daemon ignores descriptors whose LISTEN_PID names another process without a word; serve
// says so, and without --listen that is a usage error rather than a server on nothing.
TEST_F(Generations, ListenPidMismatchIsReportedNotSilentlyIgnored) {
  SpawnOptions options;
  options.env = {"LISTEN_FDS=1", "LISTEN_PID=1"};
  Child child = Child::program({kCli, "serve", "--workers", "1"}, options);
  EXPECT_EQ(child.wait_exit(20s), 2);
}

}  // namespace
}  // namespace sockshare::test
