// End-to-end tests of the sockshare command: the real binary, real HTTP over loopback.
// Readiness comes from `serve --ready-fd` over the harness's pipe; ports are picked by the
// kernel (port 0) and read back; every wait is bounded.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "linux/sys.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"
#include "support/harness.hpp"

extern char** environ;

namespace sockshare::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const std::string kCli = SOCKSHARE_CLI_PATH;
const std::string kSourceDir = SOCKSHARE_SOURCE_DIR;

int remaining_ms(Clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// ---- a tiny HTTP client --------------------------------------------------------------------

struct Response {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
};

Fd connect_tcp(std::uint16_t port, const char* source = nullptr) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fd;
  if (source != nullptr) {
    sockaddr_in local{};
    local.sin_family = AF_INET;
    ::inet_pton(AF_INET, source, &local.sin_addr);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&local), sizeof local) != 0) return Fd();
  }
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
  if (sys::retry_eintr([&] {
        return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sin), sizeof sin);
      }) != 0) {
    return Fd();
  }
  return fd;
}

bool send_all(const Fd& fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n =
        sys::retry_eintr([&] { return ::send(fd.get(), data.data(), data.size(), MSG_NOSIGNAL); });
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Everything until the peer closes (socket or pipe), or what arrived by the deadline.
std::string read_to_eof(const Fd& fd, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = Clock::now() + timeout;
  std::string data;
  char buf[4096];
  for (;;) {
    pollfd p{fd.get(), POLLIN, 0};
    int r = sys::retry_eintr([&] { return ::poll(&p, 1, remaining_ms(deadline)); });
    if (r <= 0) break;
    ssize_t n = sys::retry_eintr([&] { return ::read(fd.get(), buf, sizeof buf); });
    if (n <= 0) break;
    data.append(buf, static_cast<std::size_t>(n));
  }
  return data;
}

// Parses consecutive responses (Content-Length framed). HEAD responses have no body: pass
// their positions in `head`.
std::vector<Response> parse_responses(std::string_view data, std::set<std::size_t> head = {}) {
  std::vector<Response> out;
  while (!data.empty()) {
    auto end = data.find("\r\n\r\n");
    if (end == std::string_view::npos) break;
    Response r;
    std::string_view header_block = data.substr(0, end);
    data.remove_prefix(end + 4);
    auto line_end = header_block.find("\r\n");
    std::string_view status_line = header_block.substr(0, line_end);
    if (status_line.size() < 12 || !status_line.starts_with("HTTP/1.1 ")) break;
    r.status = std::stoi(std::string(status_line.substr(9, 3)));
    std::string_view rest =
        line_end == std::string_view::npos ? "" : header_block.substr(line_end + 2);
    while (!rest.empty()) {
      auto e = rest.find("\r\n");
      std::string_view line = rest.substr(0, e);
      rest = e == std::string_view::npos ? "" : rest.substr(e + 2);
      auto colon = line.find(':');
      if (colon == std::string_view::npos) continue;
      std::string name(line.substr(0, colon));
      for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string_view value = line.substr(colon + 1);
      while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
      r.headers[name] = std::string(value);
    }
    std::size_t length =
        r.headers.count("content-length") ? std::stoul(r.headers["content-length"]) : 0;
    if (head.count(out.size()) == 0) {
      if (data.size() < length) break;
      r.body = std::string(data.substr(0, length));
      data.remove_prefix(length);
    }
    out.push_back(std::move(r));
  }
  return out;
}

std::optional<Response> http_get(std::uint16_t port, const std::string& path = "/",
                                 const char* source = nullptr) {
  Fd fd = connect_tcp(port, source);
  if (!fd.valid()) return std::nullopt;
  if (!send_all(fd, "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")) {
    return std::nullopt;
  }
  auto responses = parse_responses(read_to_eof(fd));
  if (responses.size() != 1) return std::nullopt;
  return responses.front();
}

struct Served {
  int index = -1;
  int pid = 0;
};

// "worker 1 pid 4711\n"
std::optional<Served> who(const std::optional<Response>& r) {
  if (!r || r->status != 200) return std::nullopt;
  Served s;
  if (std::sscanf(r->body.c_str(), "worker %d pid %d", &s.index, &s.pid) != 2) return std::nullopt;
  return s;
}

// ---- running the command -------------------------------------------------------------------

struct Captured {
  int status = -1;
  std::string out;  // stdout and stderr together
};

// Runs the command to completion with its output captured; bounded by `timeout`.
Captured run_capture(std::vector<std::string> argv, std::chrono::milliseconds timeout = 20s) {
  Captured result;
  auto [read_end, write_end] = make_pipe(true);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), 1);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), 2);
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  write_end.reset();
  if (rc != 0) return result;
  const auto deadline = Clock::now() + timeout;
  result.out = read_to_eof(read_end, timeout);
  if (Clock::now() >= deadline) {
    ADD_FAILURE() << argv[0] << " still running after " << timeout.count() << " ms";
    ::kill(pid, SIGKILL);
  }
  int status = 0;
  if (sys::retry_eintr([&] { return ::waitpid(pid, &status, 0); }) == pid) {
    result.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  return result;
}

// A running `sockshare serve`.
struct Server {
  Child child;
  std::map<std::string, std::string> listening;  // name -> endpoint
  std::string control;
  std::uint16_t port = 0;  // of the first listener

  Server() = default;
  Server(Server&&) = default;
  Server& operator=(Server&&) = default;
  // A graceful stop, so no test leaves a control socket file behind (SIGKILL would).
  ~Server() {
    if (child.running()) {
      child.kill(SIGTERM);
      child.wait_exit(20s);
    }
  }

  // `wrapper`: a program and its arguments to run serve with (e.g. prlimit).
  static Server start(std::vector<std::string> args, std::vector<std::string> wrapper = {}) {
    Server s;
    std::vector<std::string> argv = wrapper;
    argv.insert(argv.end(), {kCli, "serve", "--ready-fd", "3"});
    argv.insert(argv.end(), args.begin(), args.end());
    s.child = Child::program(argv);
    for (int i = 0; i < 16; ++i) {
      std::string line = s.child.wait_ready(20s);
      if (line.empty() || line == "ready") break;
      if (line.starts_with("listening ")) {
        auto space = line.find(' ', 10);
        std::string name = line.substr(10, space - 10);
        std::string endpoint = line.substr(space + 1);
        if (s.listening.empty()) {
          s.port = static_cast<std::uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1)));
        }
        s.listening[name] = endpoint;
      } else if (line.starts_with("control ")) {
        s.control = line.substr(8);
      }
    }
    return s;
  }

  [[nodiscard]] std::string status() const {
    return run_capture({kCli, "status", "--control", control}).out;
  }
};

// "<who> worker I pid P listener NAME", as the test's external workers answer.
struct WorkerReply {
  int index = -1;
  int pid = 0;
  std::string listener;
};
std::optional<WorkerReply> worker_reply(const std::string& body, const std::string& who) {
  WorkerReply reply;
  char listener[32] = {};
  const std::string format = who + " worker %d pid %d listener %31s";
  if (std::sscanf(body.c_str(), format.c_str(), &reply.index, &reply.pid, listener) != 3) {
    return std::nullopt;
  }
  reply.listener = listener;
  return reply;
}

std::string python3() {
  for (const char* candidate : {"/usr/bin/python3", "/usr/local/bin/python3"}) {
    if (::access(candidate, X_OK) == 0) return candidate;
  }
  return "python3";  // serve resolves it in PATH
}

class Cli : public FdLeakTest {};

// ---- conventions ---------------------------------------------------------------------------

TEST_F(Cli, HelpAndVersionExitZero) {
  Captured help = run_capture({kCli, "--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("serve"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("status"), std::string::npos) << help.out;
  Captured serve_help = run_capture({kCli, "serve", "--help"});
  EXPECT_EQ(serve_help.status, 0);
  EXPECT_NE(serve_help.out.find("--listen"), std::string::npos) << serve_help.out;
  EXPECT_NE(serve_help.out.find("--drain-timeout"), std::string::npos) << serve_help.out;
  Captured version = run_capture({kCli, "--version"});
  EXPECT_EQ(version.status, 0);
  EXPECT_NE(version.out.find("sockshare "), std::string::npos) << version.out;
}

TEST_F(Cli, UsageErrorsExitTwo) {
  const std::vector<std::vector<std::string>> cases = {
      {kCli},
      {kCli, "frobnicate"},
      {kCli, "serve"},
      {kCli, "serve", "--listen", "127.0.0.1"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--workers", "0"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--policy", "random"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--mode", "fork"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--reuseport"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--mode", "inherit", "--policy", "least"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--mode", "inherit", "--max-attempts", "2"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--max-attempts", "-1"},
      {kCli, "serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:9"},
      {kCli, "serve", "--listen", "a=127.0.0.1:0", "--listen", "a=127.0.0.1:0"},
      {kCli, "status"},
      {kCli, "status", "--control", "nonsense"},
  };
  for (const auto& argv : cases) {
    Captured r = run_capture(argv);
    std::string joined;
    for (const auto& a : argv) joined += a + " ";
    EXPECT_EQ(r.status, 2) << joined << "\n" << r.out;
  }
}

TEST_F(Cli, StatusWithoutServerFailsWithOne) {
  Captured r = run_capture(
      {kCli, "status", "--control", "unix:@sockshare-test-nobody-" + std::to_string(::getpid())});
  EXPECT_EQ(r.status, 1) << r.out;
}

TEST_F(Cli, RuntimeFailuresExitOne) {
  // A port someone else holds, and a worker command that does not exist.
  Fd taken(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  ::inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
  ASSERT_EQ(::bind(taken.get(), reinterpret_cast<sockaddr*>(&sin), sizeof sin), 0);
  ASSERT_EQ(::listen(taken.get(), 1), 0);
  socklen_t len = sizeof sin;
  ASSERT_EQ(::getsockname(taken.get(), reinterpret_cast<sockaddr*>(&sin), &len), 0);
  const std::string busy = "127.0.0.1:" + std::to_string(ntohs(sin.sin_port));
  Captured r = run_capture({kCli, "serve", "--listen", busy});
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("EADDRINUSE"), std::string::npos) << r.out;
  Captured missing = run_capture(
      {kCli, "serve", "--listen", "127.0.0.1:0", "--", "sockshare-test-no-such-worker"});
  EXPECT_EQ(missing.status, 1) << missing.out;
}

TEST_F(Cli, StaleControlSocketOfAKilledServerIsReplaced) {
  // A serve killed with SIGKILL leaves its control socket file; the next one must start.
  const std::string path = "/tmp/sockshare-cli-test-" + std::to_string(::getpid()) + ".sock";
  {
    Server first =
        Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--control", "unix:" + path});
    ASSERT_EQ(first.control, "unix:" + path);
    first.child.kill(SIGKILL);
    EXPECT_EQ(first.child.wait_exit(20s), 128 + SIGKILL);
  }
  ASSERT_EQ(::access(path.c_str(), F_OK), 0) << "the killed server left no socket file";
  Server second =
      Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--control", "unix:" + path});
  ASSERT_NE(second.port, 0);
  Captured status = run_capture({kCli, "status", "--control", "unix:" + path});
  EXPECT_EQ(status.status, 0) << status.out;
  // While it runs, a third one must not take the socket over.
  Captured third =
      run_capture({kCli, "serve", "--listen", "127.0.0.1:0", "--control", "unix:" + path});
  EXPECT_EQ(third.status, 1) << third.out;
  second.child.kill(SIGTERM);
  EXPECT_EQ(second.child.wait_exit(20s), 0);
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "a clean shutdown removes the socket file";
}

TEST_F(Cli, WorkerReportsLISTEN_PIDMismatch) {
  // A LISTEN_PID naming another process means the listeners were not meant for this one.
  Captured r = run_capture({"/usr/bin/env", "LISTEN_FDS=1", "LISTEN_PID=1", kCli, "__worker"});
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("LISTEN_PID=1"), std::string::npos) << r.out;
}

// ---- dispatch mode, built-in worker --------------------------------------------------------

TEST_F(Cli, S6_DispatchRoundRobinReachesBothWorkers) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--policy", "rr"});
  ASSERT_NE(s.port, 0);
  std::map<int, int> per_index;
  std::set<int> pids;
  for (int i = 0; i < 20; ++i) {
    auto served = who(http_get(s.port));
    ASSERT_TRUE(served) << "request " << i;
    ++per_index[served->index];
    pids.insert(served->pid);
  }
  EXPECT_EQ(per_index.size(), 2U);
  EXPECT_EQ(pids.size(), 2U);
  // Round-robin over two workers that are both up: sequential requests alternate.
  EXPECT_EQ(per_index[0], 10);
  EXPECT_EQ(per_index[1], 10);
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

TEST_F(Cli, S6_DispatchHashIsStickyPerClientAddress) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--policy", "hash"});
  ASSERT_NE(s.port, 0);
  std::set<int> used;
  for (int host = 1; host <= 12; ++host) {
    const std::string source = "127.0.0." + std::to_string(10 + host);
    std::set<int> for_this_client;
    for (int i = 0; i < 5; ++i) {
      auto served = who(http_get(s.port, "/", source.c_str()));
      ASSERT_TRUE(served) << source;
      for_this_client.insert(served->index);
    }
    EXPECT_EQ(for_this_client.size(), 1U) << "client " << source << " moved between workers";
    used.insert(for_this_client.begin(), for_this_client.end());
  }
  // 12 addresses all hashing to one of two workers would be a 1-in-2048 coincidence.
  EXPECT_EQ(used.size(), 2U);
}

TEST_F(Cli, HttpKeepAlivePipeliningHeadAndErrors) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1"});
  ASSERT_NE(s.port, 0);
  {
    // Three pipelined requests in one write, the middle one HEAD, the last one closing.
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(fd.valid());
    ASSERT_TRUE(send_all(fd,
                         "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                         "HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
                         "GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    auto responses = parse_responses(read_to_eof(fd), {1});
    ASSERT_EQ(responses.size(), 3U);
    EXPECT_EQ(responses[0].status, 200);
    EXPECT_TRUE(who(responses[0]));
    EXPECT_EQ(responses[0].headers.count("connection"), 0U);
    EXPECT_EQ(responses[1].status, 200);
    EXPECT_EQ(responses[1].body, "");
    EXPECT_EQ(responses[1].headers["content-length"], std::to_string(responses[0].body.size()));
    EXPECT_EQ(responses[2].headers["connection"], "close");
  }
  {
    // A request split across writes, with a body that must be skipped, then garbage.
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(send_all(fd, "POST / HTTP/1.1\r\nHost: x\r\nContent-Le"));
    ASSERT_TRUE(send_all(fd, "ngth: 5\r\n\r\nhello"));
    ASSERT_TRUE(send_all(fd, "this is not http\r\n\r\n"));
    auto responses = parse_responses(read_to_eof(fd));
    ASSERT_EQ(responses.size(), 2U);
    EXPECT_EQ(responses[0].status, 405);
    EXPECT_EQ(responses[1].status, 400);
    EXPECT_EQ(responses[1].headers["connection"], "close");
  }
  for (std::string bad :
       {"GET / HTTP/1.1\r\n\r\n",  // no Host
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET /burn?ms=lots HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"}) {
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(send_all(fd, bad));
    auto responses = parse_responses(read_to_eof(fd));
    ASSERT_EQ(responses.size(), 1U) << bad;
    EXPECT_EQ(responses[0].status, 400) << bad;
  }
  {
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(
        send_all(fd, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(9000, 'a') + "\r\n\r\n"));
    auto responses = parse_responses(read_to_eof(fd));
    ASSERT_EQ(responses.size(), 1U);
    EXPECT_EQ(responses[0].status, 431);
  }
  {
    // HTTP/1.0 closes unless asked to keep alive.
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(send_all(fd, "GET / HTTP/1.0\r\n\r\n"));
    auto responses = parse_responses(read_to_eof(fd));
    ASSERT_EQ(responses.size(), 1U);
    EXPECT_EQ(responses[0].status, 200);
    EXPECT_EQ(responses[0].headers["connection"], "close");
  }
}

// One response from a connection that stays open: headers, then Content-Length bytes.
std::string read_one_response(const Fd& fd, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = Clock::now() + timeout;
  std::string data;
  char buf[4096];
  for (;;) {
    if (auto end = data.find("\r\n\r\n"); end != std::string::npos) {
      auto at = data.find("Content-Length: ");
      if (at != std::string::npos && at < end) {
        const std::size_t length = std::stoul(data.substr(at + 16));
        if (data.size() >= end + 4 + length) return data;
      }
    }
    pollfd p{fd.get(), POLLIN, 0};
    if (sys::retry_eintr([&] { return ::poll(&p, 1, remaining_ms(deadline)); }) <= 0) return data;
    ssize_t n = sys::retry_eintr([&] { return ::read(fd.get(), buf, sizeof buf); });
    if (n <= 0) return data;
    data.append(buf, static_cast<std::size_t>(n));
  }
}

// Polls `sockshare status` until its text contains `needle` (bounded).
bool wait_for_status(const Server& s, const std::string& needle, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (s.status().find(needle) != std::string::npos) return true;
    std::this_thread::sleep_for(20ms);  // between polls only: the condition is re-checked
  }
  return false;
}

// RFC 9110 10.1.1: a client that sends "Expect: 100-continue" may hold its body back until
// it sees "100 Continue"; an origin server must not wait for the body before sending it.
TEST_F(Cli, HttpExpect100ContinueIsAnsweredBeforeTheBody) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1"});
  ASSERT_NE(s.port, 0);
  // Reads exactly `expected.size()` bytes (bounded), so a second interim answer is not hidden
  // in what is read next.
  auto read_exactly = [](const Fd& fd, std::size_t count) {
    std::string got;
    char buf[256];
    while (got.size() < count) {
      pollfd p{fd.get(), POLLIN, 0};
      if (sys::retry_eintr([&] { return ::poll(&p, 1, 10000); }) != 1) break;
      const ssize_t n = ::read(fd.get(), buf, std::min(sizeof buf, count - got.size()));
      if (n <= 0) break;
      got.append(buf, static_cast<std::size_t>(n));
    }
    return got;
  };
  const std::string interim = "HTTP/1.1 100 Continue\r\n\r\n";
  {
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(send_all(fd,
                         "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         "Expect: 100-continue\r\n\r\n"));
    EXPECT_EQ(read_exactly(fd, interim.size()), interim) << "no 100 while the body is held back";
    // Part of the body: the request is still incomplete, and its 100 is not sent again.
    ASSERT_TRUE(send_all(fd, "he"));
    pollfd p{fd.get(), POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 200), 0) << "something was sent before the body was complete";
    ASSERT_TRUE(send_all(fd, "llo"));
    const std::string first = read_one_response(fd);
    EXPECT_TRUE(first.starts_with("HTTP/1.1 405")) << first;
    // The next request on the connection gets its own 100.
    ASSERT_TRUE(send_all(fd,
                         "POST /again HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                         "Expect: 100-continue\r\nConnection: close\r\n\r\n"));
    EXPECT_EQ(read_exactly(fd, interim.size()), interim);
    ASSERT_TRUE(send_all(fd, "abc"));
    auto responses = parse_responses(read_to_eof(fd));
    ASSERT_EQ(responses.size(), 1U);
    EXPECT_EQ(responses[0].status, 405);
  }
  struct OneShot {
    std::string request;
    std::string answer;  // how the whole reply starts
  };
  for (const OneShot& c : {
           // Body sent along with the head: nothing to wait for, so no interim response.
           OneShot{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                   "Expect: 100-continue\r\nConnection: close\r\n\r\nhi",
                   "HTTP/1.1 405"},
           // A head the worker refuses anyway gets its final answer at once, not a 100.
           OneShot{"POST /burn?ms=lots HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
                   "Expect: 100-continue\r\n\r\n",
                   "HTTP/1.1 400"}}) {
    Fd fd = connect_tcp(s.port);
    ASSERT_TRUE(send_all(fd, c.request));
    const std::string all = read_to_eof(fd);
    EXPECT_TRUE(all.starts_with(c.answer)) << c.request << "\n->\n" << all;
  }
  // curl waits for the 100 up to --expect100-timeout before it sends the body anyway: with
  // 30 s there and 10 s in all, the upload only succeeds if the worker answers the
  // expectation.
  const std::string curl = "/usr/bin/curl";
  ASSERT_EQ(::access(curl.c_str(), X_OK), 0) << "curl is missing: scripts/deps.sh installs it";
  Captured upload = run_capture({curl, "-sS", "--max-time", "10", "--expect100-timeout", "30",
                                 "-H", "Expect: 100-continue", "--data-binary", std::string(3000, 'x'),
                                 "-o", "/dev/null", "-w", "%{http_code}",
                                 "http://127.0.0.1:" + std::to_string(s.port) + "/"});
  EXPECT_EQ(upload.status, 0) << upload.out;
  EXPECT_EQ(upload.out, "405") << upload.out;
}

TEST_F(Cli, DispatchKeepAliveConnectionHandedOffBeforeItsFirstRequest) {
  // Without deferred accept the worker gets the connection before its request: it registers
  // it with epoll once (one-shot), then for good when the client keeps the connection open.
  // Each request here is sent only after the previous answer, so every one of them needs the
  // registration to be live.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--defer-accept", "0"});
  ASSERT_NE(s.port, 0);
  Fd fd = connect_tcp(s.port);
  ASSERT_TRUE(fd.valid());
  // The ack leaves the worker just before its first read of the connection, so request 0 may
  // still be read at once; the later ones can only arrive through the registration.
  ASSERT_TRUE(wait_for_status(s, "acknowledged 1 ")) << s.status();
  std::optional<int> pid;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(send_all(fd, "GET /" + std::to_string(i) + " HTTP/1.1\r\nHost: x\r\n\r\n"));
    const std::string response = read_one_response(fd);
    auto parsed = parse_responses(response);
    ASSERT_EQ(parsed.size(), 1U) << "request " << i << ": " << response;
    auto served = who(parsed.front());
    ASSERT_TRUE(served) << response;
    if (!pid) pid = served->pid;
    EXPECT_EQ(served->pid, *pid) << "one connection, one worker";
  }
  ASSERT_TRUE(send_all(fd, "GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  auto last = parse_responses(read_to_eof(fd));
  ASSERT_EQ(last.size(), 1U);
  EXPECT_EQ(last.front().headers["connection"], "close");
}

TEST_F(Cli, DispatchPeekedBytesReachTheWorker) {
  // The dispatcher reads the first bytes before the handoff; the worker must treat them as
  // the start of the request, not lose them.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--peek-bytes", "16"});
  ASSERT_NE(s.port, 0);
  for (int i = 0; i < 6; ++i) {
    auto served = who(http_get(s.port, "/peeked-" + std::to_string(i)));
    EXPECT_TRUE(served) << "request " << i;
  }
}

TEST_F(Cli, S6_ExternalCommandInDispatchMode) {
  // Any program that speaks the channel from SOCKSHARE_CHANNEL_FD: here the worker binary run
  // as an explicit COMMAND.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--", kCli, "__worker"});
  ASSERT_NE(s.port, 0);
  std::set<int> indexes;
  for (int i = 0; i < 6; ++i) {
    auto served = who(http_get(s.port));
    ASSERT_TRUE(served);
    indexes.insert(served->index);
  }
  EXPECT_EQ(indexes.size(), 2U);
}

TEST_F(Cli, S6_ExternalPythonWorkerInDispatchMode) {
  // The worker protocol of docs/DISPATCH.md from Python's standard library, with peeked first
  // bytes that the worker must put back in front of the request.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--peek-bytes", "8", "--",
                            python3(), kSourceDir + "/tests/cli/dispatch_worker.py"});
  ASSERT_NE(s.port, 0);
  std::set<int> indexes;
  for (int i = 0; i < 6; ++i) {
    auto r = http_get(s.port);
    ASSERT_TRUE(r) << "request " << i;
    EXPECT_EQ(r->status, 200);
    int index = -1, pid = 0;
    char listener[32] = {}, peer[64] = {};
    ASSERT_EQ(
        std::sscanf(r->body.c_str(), "python dispatch worker %d pid %d listener %31s peer %63s",
                    &index, &pid, listener, peer),
        4)
        << r->body;
    EXPECT_STREQ(listener, "http");
    EXPECT_TRUE(std::string_view(peer).starts_with("127.0.0.1:")) << peer;
    indexes.insert(index);
  }
  EXPECT_EQ(indexes.size(), 2U);
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

// ---- inherit mode --------------------------------------------------------------------------

TEST_F(Cli, S6_InheritModeSharedListenerBuiltInWorker) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--listen",
                            "unix=unix:@sockshare-cli-test-" + std::to_string(::getpid()),
                            "--workers", "2", "--mode", "inherit"});
  ASSERT_NE(s.port, 0);
  ASSERT_EQ(s.listening.size(), 2U);
  std::set<int> pids;
  for (int i = 0; i < 20; ++i) {
    auto served = who(http_get(s.port));
    ASSERT_TRUE(served) << "request " << i;
    EXPECT_TRUE(served->index == 0 || served->index == 1);
    pids.insert(served->pid);
  }
  EXPECT_LE(pids.size(), 2U);
  // No dispatcher in this mode: status shows the supervisor's view only.
  Captured status = run_capture({kCli, "status", "--control", s.control});
  EXPECT_EQ(status.status, 0) << status.out;
  EXPECT_NE(status.out.find("mode inherit, one shared listener"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("worker 1"), std::string::npos) << status.out;
  EXPECT_EQ(status.out.find("accepted"), std::string::npos) << status.out;
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

TEST_F(Cli, S6_InheritModeReusePortPerWorker) {
  Server s = Server::start(
      {"--listen", "127.0.0.1:0", "--workers", "2", "--mode", "inherit", "--reuseport"});
  ASSERT_NE(s.port, 0);
  std::set<int> indexes;
  // The kernel spreads by a hash of the client's port: 40 connections reach both listeners
  // unless the hash is badly broken.
  for (int i = 0; i < 40; ++i) {
    auto served = who(http_get(s.port));
    ASSERT_TRUE(served) << "request " << i;
    indexes.insert(served->index);
  }
  EXPECT_EQ(indexes.size(), 2U);
}

// A worker that drains while a connection's wake-up is already on its way to it: with one
// shared listener and EPOLLEXCLUSIVE only that worker was woken, so if it closed its copy of
// the listener without accepting, the client would wait for someone else's next wake-up
// (here there is nobody else: it would wait forever). It takes what is queued first.
TEST_F(Cli, S6_DrainingInheritWorkerServesTheConnectionItWasWokenFor) {
  Fd listener = sockshare::listen_on(sockshare::parse_endpoint("127.0.0.1:0"));
  const std::uint16_t port = sockshare::local_endpoint(listener.borrow()).port;
  // LISTEN_PID must name the worker itself: the shell execs it, keeping its pid.
  Child worker = Child::program(
      {"/bin/sh", "-c", "LISTEN_PID=$$ exec \"$0\" __worker", kCli},
      {.inherit = {listener.borrow()}, .env = {"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}});
  std::optional<Served> served;
  const auto deadline = Clock::now() + 10s;
  while (!served && Clock::now() < deadline) served = who(http_get(port));
  ASSERT_TRUE(served) << "the worker never answered";
  ASSERT_EQ(served->pid, worker.pid());

  // Stopped, it gets SIGTERM (its signalfd turns ready) and then a connection (the listener
  // turns ready): on resume it sees both, the drain first.
  ASSERT_EQ(::kill(worker.pid(), SIGSTOP), 0);
  std::string state;
  while (state != "T" && Clock::now() < deadline + 10s) {
    std::ifstream file("/proc/" + std::to_string(worker.pid()) + "/stat");
    const std::string stat((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    auto close_paren = stat.rfind(')');
    state = close_paren == std::string::npos ? "" : stat.substr(close_paren + 2, 1);
  }
  ASSERT_EQ(state, "T");
  ASSERT_EQ(::kill(worker.pid(), SIGTERM), 0);
  Fd client = connect_tcp(port);
  ASSERT_TRUE(client.valid());
  ASSERT_TRUE(send_all(client, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  ASSERT_EQ(::kill(worker.pid(), SIGCONT), 0);

  auto responses = parse_responses(read_to_eof(client, 5s));
  ASSERT_EQ(responses.size(), 1U) << "the draining worker left the connection in the backlog";
  EXPECT_EQ(responses[0].status, 200);
  EXPECT_EQ(worker.wait_exit(10s), 0);
}

TEST_F(Cli, S6_ExternalPythonWorkerInInheritMode) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--mode", "inherit", "--",
                            python3(), kSourceDir + "/tests/cli/inherit_worker.py"});
  ASSERT_NE(s.port, 0);
  std::set<std::string> workers;
  for (int i = 0; i < 10; ++i) {
    auto r = http_get(s.port);
    ASSERT_TRUE(r) << "request " << i;
    EXPECT_EQ(r->status, 200);
    const auto reply = worker_reply(r->body, "python");
    ASSERT_TRUE(reply) << r->body;
    EXPECT_EQ(reply->listener, "http");
    workers.insert(r->body);
  }
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

// serve's synopsis: IPv4, IPv6 and unix listeners side by side, reached with curl. In
// dispatch mode every connection reaches the worker with the name of the listener it came
// through and its peer's address; in inherit mode the built-in worker accepts on all three.
TEST_F(Cli, S6_Ipv4Ipv6AndUnixListenersSideBySideInBothModes) {
  const std::string curl = "/usr/bin/curl";
  ASSERT_EQ(::access(curl.c_str(), X_OK), 0) << "curl is missing: scripts/deps.sh installs it";
  const std::string path = "/tmp/sockshare-cli-test-three-" + std::to_string(::getpid()) + ".sock";
  const std::vector<std::string> listeners = {"--listen", "web=127.0.0.1:0", "--listen", "v6=[::1]:0",
                                              "--listen", "local=unix:" + path, "--workers", "2"};
  auto get = [&](Server& s, const std::string& name) {
    const std::string& endpoint = s.listening[name];
    std::vector<std::string> argv = {curl, "-sS", "--max-time", "10"};
    if (name == "local") {
      argv.insert(argv.end(), {"--unix-socket", path, "http://localhost/"});
    } else {
      argv.insert(argv.end(), {"-g", "http://" + endpoint + "/"});
    }
    return run_capture(argv);
  };
  {
    std::vector<std::string> args = listeners;
    args.insert(args.end(), {"--", python3(), kSourceDir + "/tests/cli/dispatch_worker.py"});
    Server s = Server::start(args);
    ASSERT_EQ(s.listening.size(), 3U);
    EXPECT_TRUE(s.listening["v6"].starts_with("[::1]:")) << s.listening["v6"];
    const Captured v4 = get(s, "web");
    EXPECT_NE(v4.out.find(" listener web peer 127.0.0.1:"), std::string::npos) << v4.out;
    const Captured v6 = get(s, "v6");
    EXPECT_NE(v6.out.find(" listener v6 peer [::1]:"), std::string::npos) << v6.out;
    const Captured local = get(s, "local");
    EXPECT_NE(local.out.find(" listener local peer unix"), std::string::npos) << local.out;
  }
  {
    std::vector<std::string> args = listeners;
    args.insert(args.end(), {"--mode", "inherit"});
    Server s = Server::start(args);
    ASSERT_EQ(s.listening.size(), 3U);
    for (const char* name : {"web", "v6", "local"}) {
      const Captured r = get(s, name);
      EXPECT_EQ(r.status, 0) << name << ": " << r.out;
      EXPECT_TRUE(r.out.starts_with("worker ")) << name << ": " << r.out;
    }
  }
}

// ---- programs and clients nobody here wrote -------------------------------------------------

std::string installed(std::initializer_list<const char*> candidates) {
  for (const char* candidate : candidates) {
    if (::access(candidate, X_OK) == 0) return candidate;
  }
  return {};
}

std::size_t count_of(std::string_view text, std::string_view what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string_view::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Both workers of `s` are still their first process (an external worker that could not take
// its listeners would have exited and been restarted); then serve stops cleanly.
void expect_both_workers_stayed_up_then_stop(Server& s) {
  const std::string status = s.status();
  EXPECT_EQ(count_of(status, "running    starts 1 exits 0"), 2U) << status;
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

std::string node_program() { return installed({"/usr/bin/node", "/usr/bin/nodejs", "/usr/local/bin/node"}); }
constexpr const char* kNodeMissing = "node is missing: scripts/deps.sh installs it (Debian package nodejs)";

// systemd-socket-proxyd knows nothing but socket activation: it takes its listeners with
// sd_listen_fds(), which ignores them unless LISTEN_PID is its own pid, and exits at once
// without any. As inherit-mode workers it runs unchanged and relays every request to a
// backend serve; no worker may have exited.
TEST_F(Cli, S6_SystemdSocketProxydRunsUnchangedAsInheritModeWorkers) {
  const std::string proxyd = installed(
      {"/usr/lib/systemd/systemd-socket-proxyd", "/lib/systemd/systemd-socket-proxyd"});
  ASSERT_FALSE(proxyd.empty())
      << "systemd-socket-proxyd is missing: scripts/deps.sh installs it (Debian package systemd)";
  Server backend = Server::start({"--listen", "127.0.0.1:0", "--workers", "1"});
  ASSERT_NE(backend.port, 0);
  const auto direct = who(http_get(backend.port));
  ASSERT_TRUE(direct);
  const std::string target = "127.0.0.1:" + std::to_string(backend.port);
  for (const bool reuseport : {false, true}) {
    SCOPED_TRACE(reuseport ? "one SO_REUSEPORT listener per worker" : "one shared listener");
    std::vector<std::string> args = {"--listen", "127.0.0.1:0", "--workers", "2", "--mode",
                                     "inherit"};
    if (reuseport) args.emplace_back("--reuseport");
    args.insert(args.end(), {"--", proxyd, target});
    Server front = Server::start(args);
    ASSERT_NE(front.port, 0);
    for (int i = 0; i < 20; ++i) {
      const auto relayed = who(http_get(front.port));
      ASSERT_TRUE(relayed) << "request " << i;
      EXPECT_EQ(relayed->pid, direct->pid);
    }
    expect_both_workers_stayed_up_then_stop(front);
  }
}

// A socket-activated Node.js server (examples/node/inherit_worker.js, Node's standard library
// alone) as inherit-mode workers, on a TCP and a unix listener: both workers serve, each
// listener under its name, none exits before serve stops.
TEST_F(Cli, S6_NodeHttpServerInInheritMode) {
  const std::string node = node_program();
  ASSERT_FALSE(node.empty()) << kNodeMissing;
  const std::string socket_path = "/tmp/sockshare-cli-test-node-" + std::to_string(::getpid()) + ".sock";
  for (const bool reuseport : {false, true}) {
    SCOPED_TRACE(reuseport ? "one SO_REUSEPORT listener per worker" : "one shared listener");
    std::vector<std::string> args = {"--listen", "web=127.0.0.1:0", "--listen", "api=unix:" + socket_path,
                                     "--workers", "2", "--mode", "inherit"};
    if (reuseport) args.emplace_back("--reuseport");
    args.insert(args.end(), {"--", node, kSourceDir + "/examples/node/inherit_worker.js"});
    Server s = Server::start(args);
    ASSERT_NE(s.port, 0);
    std::set<int> indexes;
    // Over SO_REUSEPORT listeners the kernel hashes connections over both workers: with 40,
    // missing one is a broken spread, not bad luck. On a shared listener whichever process
    // wakes first takes the connection (Node polls it without EPOLLEXCLUSIVE): no spread to check.
    for (int i = 0; i < 40; ++i) {
      auto r = http_get(s.port);
      ASSERT_TRUE(r) << "request " << i;
      const auto reply = worker_reply(r->body, "node");
      ASSERT_TRUE(reply) << r->body;
      EXPECT_EQ(reply->listener, "web");
      indexes.insert(reply->index);
    }
    if (reuseport) {
      EXPECT_EQ(indexes.size(), 2U);
    }
    Fd unix_client(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path, socket_path.c_str(), socket_path.size() + 1);
    ASSERT_EQ(::connect(unix_client.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun), 0) << errno;
    ASSERT_TRUE(send_all(unix_client, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    const auto over_unix = parse_responses(read_to_eof(unix_client));
    ASSERT_EQ(over_unix.size(), 1U);
    EXPECT_NE(over_unix[0].body.find(" listener api"), std::string::npos) << over_unix[0].body;
    expect_both_workers_stayed_up_then_stop(s);
  }
}

// The Node worker alone, as any service manager runs it: a keep-alive client with a request
// half sent when SIGTERM arrives gets its answer with "Connection: close" (it would otherwise
// hold the process until its keep-alive timeout, and serve would kill it at the drain
// deadline), and the worker exits 0.
TEST_F(Cli, NodeWorkerAnswersTheRequestInProgressOnSigtermAndExitsZero) {
  const std::string node = node_program();
  ASSERT_FALSE(node.empty()) << kNodeMissing;
  Fd listener = sockshare::listen_on(sockshare::parse_endpoint("127.0.0.1:0"));
  const std::uint16_t port = sockshare::local_endpoint(listener.borrow()).port;
  // LISTEN_PID must name the worker itself: the shell execs it, keeping its pid. Its stderr
  // goes to the harness's pipe (descriptor 4, after the listener): the line it writes on
  // SIGTERM says when the signal took effect.
  Child worker = Child::program(
      {"/bin/sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\" 2>&4", node,
       kSourceDir + "/examples/node/inherit_worker.js"},
      {.inherit = {listener.borrow()}, .env = {"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}});
  listener.reset();
  Fd client = connect_tcp(port);
  ASSERT_TRUE(client.valid());
  ASSERT_TRUE(send_all(client, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n"));
  auto first = parse_responses(read_one_response(client));
  ASSERT_EQ(first.size(), 1U);
  EXPECT_EQ(first[0].headers["connection"], "keep-alive");

  ASSERT_TRUE(send_all(client, "GET /second HTTP/1.1\r\nHost: x\r\n"));
  worker.kill(SIGTERM);
  EXPECT_TRUE(worker.wait_ready(10s).starts_with("inherit_worker: SIGTERM"));
  ASSERT_TRUE(send_all(client, "\r\n"));
  auto second = parse_responses(read_to_eof(client, 4s));
  ASSERT_EQ(second.size(), 1U);
  EXPECT_EQ(second[0].status, 200);
  EXPECT_EQ(second[0].headers["connection"], "close");
  EXPECT_EQ(worker.wait_exit(10s), 0);
}

// curl reuses one keep-alive connection for two URLs (so both reach the same worker), and
// sends HEAD and HTTP/1.0; Python's http.client keeps its connection across requests and
// sees the close it asked for.
TEST_F(Cli, RealHttpClientsCurlAndPythonHttpClient) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2"});
  ASSERT_NE(s.port, 0);
  const std::string base = "http://127.0.0.1:" + std::to_string(s.port);
  const std::string curl = "/usr/bin/curl";
  ASSERT_EQ(::access(curl.c_str(), X_OK), 0) << "curl is missing: scripts/deps.sh installs it";

  Captured reuse = run_capture({curl, "-sS", "--max-time", "10", "-w", "%{http_code} %{num_connects}\n",
                                base + "/a", base + "/b"});
  ASSERT_EQ(reuse.status, 0) << reuse.out;
  std::vector<std::string> lines;
  for (std::string_view rest = reuse.out; !rest.empty();) {
    const auto end = rest.find('\n');
    lines.emplace_back(rest.substr(0, end));
    rest.remove_prefix(end == std::string_view::npos ? rest.size() : end + 1);
  }
  ASSERT_EQ(lines.size(), 4U) << reuse.out;
  EXPECT_TRUE(lines[0].starts_with("worker ")) << reuse.out;
  EXPECT_EQ(lines[1], "200 1") << reuse.out;
  EXPECT_EQ(lines[2], lines[0]) << "the second URL went over another connection";
  EXPECT_EQ(lines[3], "200 0") << "curl opened a new connection for the second URL";

  Captured head = run_capture({curl, "-sS", "--max-time", "10", "-I", base + "/"});
  EXPECT_EQ(head.status, 0) << head.out;
  EXPECT_TRUE(head.out.starts_with("HTTP/1.1 200")) << head.out;
  Captured old = run_capture({curl, "-sS", "--max-time", "10", "--http1.0", "-i", base + "/"});
  EXPECT_EQ(old.status, 0) << old.out;
  EXPECT_NE(old.out.find("Connection: close"), std::string::npos) << old.out;
  EXPECT_NE(old.out.find("\r\n\r\nworker "), std::string::npos) << old.out;

  const std::string script = R"(
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
bodies = []
for path in ("/one", "/two", "/three"):
    connection.request("GET", path)
    response = connection.getresponse()
    bodies.append(response.read().decode())
    if response.status != 200 or response.will_close:
        sys.exit(f"{path}: status {response.status}, will_close {response.will_close}")
connection.request("GET", "/last", headers={"Connection": "close"})
response = connection.getresponse()
bodies.append(response.read().decode())
if response.status != 200 or not response.will_close:
    sys.exit(f"/last: status {response.status}, will_close {response.will_close}")
print(len(set(bodies)), bodies[0].split(" pid")[0])
)";
  Captured python = run_capture({python3(), "-c", script, std::to_string(s.port)});
  EXPECT_EQ(python.status, 0) << python.out;
  EXPECT_TRUE(python.out.starts_with("1 worker ")) << "one connection, one worker: " << python.out;
}

// wrk, the load generator of bench/serve_bench.sh, for a second per mode, with keep-alive
// and with a new connection per request: every response complete and 2xx.
TEST_F(Cli, WrkLoadGeneratorSeesNoErrors) {
  const std::string wrk = "/usr/bin/wrk";
  ASSERT_EQ(::access(wrk.c_str(), X_OK), 0) << "wrk is missing: scripts/deps.sh installs it";
  for (const char* mode : {"dispatch", "inherit"}) {
    Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--mode", mode});
    ASSERT_NE(s.port, 0);
    for (const bool close : {false, true}) {
      SCOPED_TRACE(std::string(mode) + (close ? ", Connection: close" : ", keep-alive"));
      std::vector<std::string> argv = {wrk, "-t1", "-c8", "-d1s"};
      if (close) argv.insert(argv.end(), {"-H", "Connection: close"});
      argv.push_back("http://127.0.0.1:" + std::to_string(s.port) + "/");
      Captured r = run_capture(argv, 30s);
      EXPECT_EQ(r.status, 0) << r.out;
      EXPECT_EQ(r.out.find("Socket errors"), std::string::npos) << r.out;
      EXPECT_EQ(r.out.find("Non-2xx"), std::string::npos) << r.out;
      unsigned long requests = 0;
      const auto at = r.out.find(" requests in ");
      ASSERT_NE(at, std::string::npos) << r.out;
      requests = std::stoul(r.out.substr(r.out.rfind('\n', at) + 1));
      EXPECT_GE(requests, 100U) << r.out;
    }
  }
}

// ApacheBench speaks HTTP/1.0: without -k a connection per request, with -k keep-alive by
// "Connection: Keep-Alive", which an HTTP/1.0 server must echo to keep the connection open.
TEST_F(Cli, AbHttp10WithAndWithoutKeepAliveSeesNoErrors) {
  const std::string ab = "/usr/bin/ab";
  ASSERT_EQ(::access(ab.c_str(), X_OK), 0)
      << "ab is missing: scripts/deps.sh installs it (Debian package apache2-utils)";
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2"});
  ASSERT_NE(s.port, 0);
  for (const bool keep_alive : {false, true}) {
    SCOPED_TRACE(keep_alive ? "ab -k" : "ab");
    // -l: the answers name the worker's pid, whose digits may differ between the two workers;
    // ab counts a length unlike the first answer's as a failed request otherwise.
    std::vector<std::string> argv = {ab, "-q", "-l", "-n", "2000", "-c", "8", "-s", "10"};
    if (keep_alive) argv.emplace_back("-k");
    argv.push_back("http://127.0.0.1:" + std::to_string(s.port) + "/");
    Captured r = run_capture(argv, 60s);
    EXPECT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find("Complete requests:      2000"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("Failed requests:        0"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("Non-2xx"), std::string::npos) << r.out;
    if (keep_alive) {
      EXPECT_NE(r.out.find("Keep-Alive requests:    2000"), std::string::npos) << r.out;
    }
  }
}

TEST_F(Cli, R21_BuiltInWorkerAtEmfileShedsAndRecovers) {
  // A worker at its descriptor limit must not spin on a listener that stays readable, nor
  // leave the clients it cannot take hanging: it accepts and closes them, and serves again
  // once descriptors are free. Deferred accept is off: silent clients must reach the worker.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--mode", "inherit",
                            "--defer-accept", "0"},
                           {"/usr/bin/prlimit", "--nofile=20", "--"});
  ASSERT_NE(s.port, 0);
  std::vector<Fd> held;
  for (int i = 0; i < 25; ++i) {
    held.push_back(connect_tcp(s.port));
    ASSERT_TRUE(held.back().valid());
  }
  // Accepts go in order: once this one is answered or shed, all of the above were handled.
  Fd probe = connect_tcp(s.port);
  ASSERT_TRUE(send_all(probe, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  EXPECT_EQ(read_to_eof(probe), "") << "the worker answered although it should be at EMFILE";
  int shed = 0;
  for (const Fd& fd : held) {
    pollfd p{fd.get(), POLLIN, 0};
    char byte;
    if (::poll(&p, 1, 0) == 1 && ::recv(fd.get(), &byte, 1, MSG_DONTWAIT) == 0) ++shed;
  }
  EXPECT_GT(shed, 0) << "no connection was shed at the descriptor limit";
  EXPECT_LT(shed, 25) << "the worker held no connection at all";
  held.clear();
  std::optional<Served> served;
  const auto deadline = Clock::now() + 10s;
  // The worker notices the closed connections as its epoll reports them; retry until then.
  while (!served && Clock::now() < deadline) served = who(http_get(s.port));
  EXPECT_TRUE(served) << "the worker did not recover from EMFILE";
}

TEST_F(Cli, DeferredAcceptKeepsSilentConnectionsAwayFromTheWorkers) {
  // The built-in worker speaks HTTP, where the client speaks first: by default the listener
  // defers accept (TCP_DEFER_ACCEPT), so connections that have sent nothing take no worker
  // descriptor. 25 of them cannot push a worker limited to 20 descriptors to EMFILE. 30 s:
  // far longer than the test, so none is accepted for lack of data meanwhile.
  for (const char* mode : {"inherit", "dispatch"}) {
    SCOPED_TRACE(mode);
    Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--mode", mode,
                              "--defer-accept", "30"},
                             {"/usr/bin/prlimit", "--nofile=20", "--"});
    ASSERT_NE(s.port, 0);
    std::vector<Fd> silent;
    for (int i = 0; i < 25; ++i) {
      silent.push_back(connect_tcp(s.port));
      ASSERT_TRUE(silent.back().valid());
    }
    auto served = who(http_get(s.port));
    EXPECT_TRUE(served) << "a client with a request was not served past the silent ones";
    EXPECT_NE(s.status().find("deferred accept"), std::string::npos) << s.status();
    // A silent client is still served once it speaks.
    ASSERT_TRUE(send_all(silent[0], "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    EXPECT_NE(read_to_eof(silent[0]).find("200 OK"), std::string::npos);
  }
}

TEST_F(Cli, DeferredAcceptLetsASilentClientInAfterTheDeferralAndServesIt) {
  // A client that stays silent past the deferral is accepted empty (the kernel re-sent its
  // SYN-ACK, the client's ACK completed it): the worker must wait for its request, not drop
  // or misread it.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--defer-accept", "1"});
  ASSERT_NE(s.port, 0);
  Fd fd = connect_tcp(s.port);
  ASSERT_TRUE(fd.valid());
  ASSERT_TRUE(wait_for_status(s, "acknowledged 1 ")) << s.status();
  ASSERT_TRUE(send_all(fd, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  auto responses = parse_responses(read_to_eof(fd));
  ASSERT_EQ(responses.size(), 1U);
  EXPECT_TRUE(who(responses.front()));
}

TEST_F(Cli, DeferredAcceptIsOnByDefaultForTheBuiltInWorker) {
  Server builtin = Server::start({"--listen", "127.0.0.1:0", "--workers", "1"});
  ASSERT_NE(builtin.port, 0);
  EXPECT_NE(builtin.status().find("deferred accept 1 s"), std::string::npos) << builtin.status();
}

TEST_F(Cli, DeferredAcceptIsOffForAnExternalCommand) {
  // The protocol of a COMMAND is unknown: the clients of a server that speaks first (SMTP,
  // SSH) would wait out the deferral, so serve leaves TCP_DEFER_ACCEPT off unless asked.
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--", python3(),
                            kSourceDir + "/tests/cli/dispatch_worker.py"});
  ASSERT_NE(s.port, 0);
  const std::string status = s.status();
  EXPECT_NE(status.find("listener"), std::string::npos) << status;
  EXPECT_EQ(status.find("deferred accept"), std::string::npos) << status;
  // Asked for explicitly, it is on.
  Server asked = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--defer-accept", "2",
                                "--", python3(), kSourceDir + "/tests/cli/dispatch_worker.py"});
  ASSERT_NE(asked.port, 0);
  EXPECT_NE(asked.status().find("deferred accept"), std::string::npos) << asked.status();
}

// ---- failures and shutdown -----------------------------------------------------------------

// A request that crashes whichever worker receives it: passed on to a second and a third
// worker (R12), then closed (--max-attempts, default 3), so the client gets an answer of
// sorts — end of stream — instead of waiting while the workers take turns dying; status
// counts it.
TEST_F(Cli, R12_AConnectionThatCrashesEveryWorkerIsAbandonedAfterMaxAttempts) {
  // A dispatch-mode worker that says hello and dies on its first connection, before the ack.
  const std::string crash_on_receipt = R"(
import os, socket, struct, sys
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
from sockshare_channel import Channel
sock = socket.socket(fileno=int(os.environ["SOCKSHARE_CHANNEL_FD"]))
sock.setblocking(True)
channel = Channel(sock)
channel.send(0x8201, struct.pack("<II", int(os.environ["SOCKSHARE_WORKER_INDEX"]), os.getpid()))
channel.receive(allow_unix_sockets=True)
os._exit(3)
)";
  // The default, then --max-attempts 1: the first worker lost with it is the last.
  for (const auto& [max_attempts, passed_on] : {std::pair{"", 2}, std::pair{"1", 0}}) {
    SCOPED_TRACE(std::string("--max-attempts ") + max_attempts);
    std::vector<std::string> args = {"--listen", "127.0.0.1:0", "--workers", "2"};
    if (*max_attempts != '\0') args.insert(args.end(), {"--max-attempts", max_attempts});
    args.insert(args.end(), {"--", python3(), "-c", crash_on_receipt, kSourceDir + "/examples/python"});
    Server s = Server::start(args);
    ASSERT_NE(s.port, 0);
    Fd client = connect_tcp(s.port);
    ASSERT_TRUE(client.valid());
    ASSERT_TRUE(send_all(client, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    // Two workers die at once, the third after its restart backoff (100 ms): well within 20 s.
    EXPECT_EQ(read_to_eof(client, 20s), "");
    const std::string status = s.status();
    EXPECT_NE(status.find("dropped 1  abandoned 1"), std::string::npos) << status;
    EXPECT_NE(status.find("redispatched " + std::to_string(passed_on) + " "), std::string::npos) << status;
  }
}

TEST_F(Cli, R12_KilledWorkerUnderLoadIsRestartedAndRequestsKeepSucceeding) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2"});
  ASSERT_NE(s.port, 0);
  auto victim = who(http_get(s.port));
  ASSERT_TRUE(victim);
  constexpr int kClients = 4;
  std::atomic<int> done{0};
  std::atomic<int> failures{0};
  std::atomic<int> after_kill{0};
  std::atomic<bool> killed{false};
  std::atomic<bool> restarted{false};
  const auto deadline = Clock::now() + 15s;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&] {
      for (int i = 0; i < 1500 && Clock::now() < deadline; ++i) {
        const bool was_killed = killed.load();
        auto served = who(http_get(s.port));
        if (!served) {
          ++failures;
          continue;
        }
        ++done;
        if (was_killed) ++after_kill;
        if (served->index == victim->index && served->pid != victim->pid) restarted = true;
        if (restarted && after_kill > 200) break;
      }
    });
  }
  while (done < 100 && Clock::now() < deadline) std::this_thread::yield();
  ASSERT_EQ(::kill(victim->pid, SIGKILL), 0);
  killed = true;
  for (auto& t : clients) t.join();
  // Connections the victim had acknowledged and was serving die with it (at most one per
  // client, as each client has one request outstanding); every other request is answered,
  // the unacknowledged ones by the surviving worker.
  EXPECT_LE(failures.load(), kClients);
  EXPECT_GT(after_kill.load(), 200);
  EXPECT_TRUE(restarted) << "worker " << victim->index << " was not restarted";
  Captured status = run_capture({kCli, "status", "--control", s.control});
  EXPECT_EQ(status.status, 0) << status.out;
  EXPECT_NE(status.out.find("exits 1"), std::string::npos) << status.out;
  s.child.kill(SIGTERM);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
}

// Sends a request that burns `ms` of worker CPU and returns its connection once the request
// is in service: the worker reports itself busy (load 1) before burning. Invalid if that
// never showed.
Fd start_burn(const Server& s, int ms) {
  Fd busy = connect_tcp(s.port);
  if (!busy.valid() ||
      !send_all(busy, "GET /burn?ms=" + std::to_string(ms) +
                          " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) {
    return Fd();
  }
  return wait_for_status(s, "load 1 busy") ? std::move(busy) : Fd();
}

TEST_F(Cli, S6_LeastLoadedRoutesAroundABusyWorker) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2", "--policy", "least"});
  ASSERT_NE(s.port, 0);
  Fd busy = start_burn(s, 1500);
  ASSERT_TRUE(busy.valid());
  const auto started = Clock::now();
  std::set<int> quick;
  for (int i = 0; i < 10; ++i) {
    auto served = who(http_get(s.port));
    ASSERT_TRUE(served);
    quick.insert(served->index);
  }
  const auto quick_time = Clock::now() - started;
  auto slow = parse_responses(read_to_eof(busy));
  ASSERT_EQ(slow.size(), 1U);
  auto burner = who(slow[0]);
  ASSERT_TRUE(burner);
  // Every quick request went to the idle worker, none waited behind the burn.
  ASSERT_EQ(quick.size(), 1U);
  EXPECT_NE(*quick.begin(), burner->index);
  EXPECT_LT(quick_time, 1500ms);
}

TEST_F(Cli, SigtermDrainsRequestInServiceAndExitsZero) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "1", "--drain-timeout", "10"});
  ASSERT_NE(s.port, 0);
  Fd busy = start_burn(s, 600);
  ASSERT_TRUE(busy.valid());
  s.child.kill(SIGTERM);
  auto responses = parse_responses(read_to_eof(busy));
  ASSERT_EQ(responses.size(), 1U);
  EXPECT_EQ(responses[0].status, 200);
  EXPECT_EQ(s.child.wait_exit(20s), 0);
  // Drained: nobody listens any more.
  EXPECT_FALSE(connect_tcp(s.port).valid());
}

TEST_F(Cli, StatusShowsCountersInTextAndPrometheus) {
  Server s = Server::start({"--listen", "127.0.0.1:0", "--workers", "2"});
  ASSERT_NE(s.port, 0);
  ASSERT_FALSE(s.control.empty());
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(who(http_get(s.port)));
  Captured text = run_capture({kCli, "status", "--control", s.control});
  EXPECT_EQ(text.status, 0) << text.out;
  EXPECT_NE(text.out.find("accepted 7"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("acknowledged 7"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("worker 0"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("worker 1"), std::string::npos) << text.out;
  Captured prom = run_capture({kCli, "status", "--control", s.control, "--prometheus"});
  EXPECT_EQ(prom.status, 0) << prom.out;
  EXPECT_NE(prom.out.find("# TYPE"), std::string::npos) << prom.out;
  EXPECT_NE(prom.out.find(" 7\n"), std::string::npos) << prom.out;
  EXPECT_NE(prom.out.find("sockshare_supervisor_worker_up{index=\"1\"} 1"), std::string::npos)
      << prom.out;
  // SIGHUP (no reload yet) is logged and changes nothing: still serving, same workers.
  s.child.kill(SIGHUP);
  EXPECT_TRUE(who(http_get(s.port)));
  Captured after = run_capture({kCli, "status", "--control", s.control});
  EXPECT_NE(after.out.find("accepted 8"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("starts 1 exits 0"), std::string::npos) << after.out;
}

}  // namespace
}  // namespace sockshare::test
