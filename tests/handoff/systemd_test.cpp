// The systemd conventions: LISTEN_FDS parsing (pure and in a real process), preparing a
// child's environment and descriptors, and sd_notify to a socket the test owns.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "sockshare/error.hpp"
#include "sockshare/systemd.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using systemd::ListenStatus;
using test::Child;

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

// "key=value key=value" -> map; values have no spaces except the last key "diag", which
// takes the rest of the line.
std::map<std::string, std::string> fields(const std::string& line) {
  std::map<std::string, std::string> out;
  std::istringstream in(line);
  std::string word;
  while (in >> word) {
    const auto eq = word.find('=');
    if (eq == std::string::npos) continue;
    std::string key = word.substr(0, eq);
    std::string value = word.substr(eq + 1);
    if (key == "diag") {
      std::string rest;
      std::getline(in, rest);
      value += rest;
      out[key] = value;
      break;
    }
    out[key] = value;
  }
  return out;
}

// ---- parse_listen_environment: the pure validation ----

TEST(SystemdParse, ActivatedWithNames) {
  auto p = systemd::parse_listen_environment("2", "100", "web:admin", 100);
  EXPECT_EQ(p.status, ListenStatus::activated);
  EXPECT_TRUE(p.addressed_to_us);
  ASSERT_EQ(p.names.size(), 2u);
  EXPECT_EQ(p.names[0], "web");
  EXPECT_EQ(p.names[1], "admin");
}

TEST(SystemdParse, NamesDefaultToUnknownAsSystemdDoes) {
  auto p = systemd::parse_listen_environment("2", "7", std::nullopt, 7);
  ASSERT_EQ(p.status, ListenStatus::activated);
  EXPECT_EQ(p.names, (std::vector<std::string>{"unknown", "unknown"}));
}

TEST(SystemdParse, NotActivatedWithoutListenFds) {
  auto p = systemd::parse_listen_environment(std::nullopt, "7", "web", 7);
  EXPECT_EQ(p.status, ListenStatus::not_activated);
  EXPECT_TRUE(p.diagnostic.empty());
}

TEST(SystemdParse, PidMismatchIsReportedWithBothPids) {
  auto p = systemd::parse_listen_environment("1", "4242", "web", 77);
  EXPECT_EQ(p.status, ListenStatus::pid_mismatch);
  EXPECT_FALSE(p.addressed_to_us);
  EXPECT_TRUE(p.names.empty());
  EXPECT_TRUE(contains(p.diagnostic, "LISTEN_PID=4242")) << p.diagnostic;
  EXPECT_TRUE(contains(p.diagnostic, "pid 77")) << p.diagnostic;
}

TEST(SystemdParse, MalformedListenFdsRejected) {
  for (const char* bad : {"", "-1", "+1", " 1", "1 ", "01", "2x", "0x2", "99999999999", "1048577"}) {
    auto p = systemd::parse_listen_environment(bad, "7", std::nullopt, 7);
    EXPECT_EQ(p.status, ListenStatus::invalid) << "LISTEN_FDS=\"" << bad << "\"";
    EXPECT_TRUE(contains(p.diagnostic, "LISTEN_FDS")) << p.diagnostic;
    EXPECT_FALSE(p.addressed_to_us);
  }
}

TEST(SystemdParse, MalformedOrMissingListenPidRejected) {
  for (const char* bad : {"", "0", "-7", "7a", "abc", "99999999999"}) {
    auto p = systemd::parse_listen_environment("1", bad, std::nullopt, 7);
    EXPECT_EQ(p.status, ListenStatus::invalid) << "LISTEN_PID=\"" << bad << "\"";
    EXPECT_TRUE(contains(p.diagnostic, "LISTEN_PID")) << p.diagnostic;
  }
  auto missing = systemd::parse_listen_environment("1", std::nullopt, std::nullopt, 7);
  EXPECT_EQ(missing.status, ListenStatus::invalid);
  EXPECT_TRUE(contains(missing.diagnostic, "LISTEN_PID is not")) << missing.diagnostic;
}

TEST(SystemdParse, NameCountMismatchRejected) {
  auto fewer = systemd::parse_listen_environment("3", "7", "a:b", 7);
  EXPECT_EQ(fewer.status, ListenStatus::invalid);
  EXPECT_TRUE(contains(fewer.diagnostic, "2 names for the 3 descriptors")) << fewer.diagnostic;
  EXPECT_TRUE(fewer.addressed_to_us);  // the descriptors are ours: they still get CLOEXEC
  auto more = systemd::parse_listen_environment("1", "7", "a:b", 7);
  EXPECT_EQ(more.status, ListenStatus::invalid);
  EXPECT_TRUE(contains(more.diagnostic, "more names")) << more.diagnostic;
  auto empty_for_one = systemd::parse_listen_environment("1", "7", "", 7);
  EXPECT_EQ(empty_for_one.status, ListenStatus::invalid);
  auto zero = systemd::parse_listen_environment("0", "7", "", 7);
  EXPECT_EQ(zero.status, ListenStatus::activated);
  EXPECT_TRUE(zero.names.empty());
}

TEST(SystemdParse, InvalidNamesRejected) {
  std::string error;
  EXPECT_FALSE(systemd::parse_fd_names("a::b", 3, error));
  EXPECT_TRUE(contains(error, "entry 1")) << error;
  EXPECT_FALSE(systemd::parse_fd_names(std::string("a\nb"), 1, error));
  EXPECT_TRUE(contains(error, "\\x0a")) << error;  // control characters are escaped in reports
  EXPECT_FALSE(systemd::parse_fd_names(std::string(256, 'x'), 1, error));
  EXPECT_TRUE(systemd::parse_fd_names(std::string(255, 'x'), 1, error));
  EXPECT_FALSE(systemd::parse_fd_names("caf\xc3\xa9", 1, error));
  EXPECT_FALSE(systemd::is_valid_name(""));
  EXPECT_FALSE(systemd::is_valid_name("a:b"));
  EXPECT_TRUE(systemd::is_valid_name("web-8080_v2.sock"));
}

// ---- listen_fds_from_environment in a real process ----

// Reports what listen_fds_from_environment() made of its environment and descriptors. With
// argument "self" it first sets LISTEN_PID to its own pid (the harness cannot know the pid
// before the child exists; spawn_activated() below can).
SOCKSHARE_HELPER(handoff_listen_fds_report) {
  if (!ctx.args().empty() && ctx.args()[0] == "self") {
    ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  }
  const int flags_before = ::fcntl(3, F_GETFD);
  auto result = systemd::listen_fds_from_environment();
  const int flags_after = ::fcntl(3, F_GETFD);
  std::string line = "status=" + std::string(systemd::to_string(result.status));
  for (char& c : line) c = c == ' ' ? '_' : c;
  line += " count=" + std::to_string(result.sockets.size());
  line += " cloexec_before=" + std::to_string(flags_before >= 0 && (flags_before & FD_CLOEXEC) != 0);
  line += " cloexec_after=" + std::to_string(flags_after >= 0 && (flags_after & FD_CLOEXEC) != 0);
  line += " fd3_open=" + std::to_string(flags_after >= 0);
  const bool env_gone = std::getenv("LISTEN_FDS") == nullptr && std::getenv("LISTEN_PID") == nullptr &&
                        std::getenv("LISTEN_FDNAMES") == nullptr;
  line += " env_unset=" + std::to_string(env_gone);
  for (auto& s : result.sockets) {
    line += " name=" + s.name + " fd=" + std::to_string(s.fd.get()) +
            " listening=" + std::to_string(s.identity.listening) +
            " cookie=" + std::to_string(s.identity.cookie);
  }
  line += " diag=" + result.diagnostic;
  ctx.ready(line);
  return 0;
}

class SystemdListenFds : public test::FdLeakTest {
protected:
  std::map<std::string, std::string> run(std::vector<std::string> env, std::vector<std::string> args = {}) {
    test::SpawnOptions options;
    options.inherit = {listener_.borrow()};
    options.env = std::move(env);
    options.args = std::move(args);
    Child child = Child::helper("handoff_listen_fds_report", std::move(options));
    const std::string line = child.wait_ready();
    EXPECT_EQ(child.wait_exit(), 0) << line;
    return fields(line);
  }
  void SetUp() override {
    FdLeakTest::SetUp();
    listener_ = listen_on(parse_endpoint("127.0.0.1:0"));
    cookie_ = identify(listener_.borrow()).cookie;
  }
  void TearDown() override {
    listener_.reset();
    FdLeakTest::TearDown();
  }
  Fd listener_;
  std::uint64_t cookie_ = 0;
};

TEST_F(SystemdListenFds, TakesListenersSetsCloexecAndUnsetsEnvironment) {
  auto f = run({"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}, {"self"});
  EXPECT_EQ(f["status"], "activated") << f["diag"];
  EXPECT_EQ(f["count"], "1");
  EXPECT_EQ(f["name"], "web");
  EXPECT_EQ(f["fd"], "3");
  EXPECT_EQ(f["listening"], "1");
  EXPECT_EQ(f["cookie"], std::to_string(cookie_));  // the very socket this process opened
  EXPECT_EQ(f["cloexec_before"], "0");  // inherited descriptors arrive inheritable
  EXPECT_EQ(f["cloexec_after"], "1");
  EXPECT_EQ(f["env_unset"], "1");
}

TEST_F(SystemdListenFds, PidMismatchReportedAndNothingTaken) {
  auto f = run({"LISTEN_FDS=1", "LISTEN_FDNAMES=web", "LISTEN_PID=1"});
  EXPECT_EQ(f["status"], "LISTEN_PID_mismatch");
  EXPECT_EQ(f["count"], "0");
  EXPECT_TRUE(contains(f["diag"], "LISTEN_PID=1 names another process")) << f["diag"];
  EXPECT_EQ(f["fd3_open"], "1");        // not ours: not closed
  EXPECT_EQ(f["cloexec_after"], "0");   // and not touched
  EXPECT_EQ(f["env_unset"], "1");
}

TEST_F(SystemdListenFds, MalformedCountReported) {
  auto f = run({"LISTEN_FDS=one", "LISTEN_FDNAMES=web"}, {"self"});
  EXPECT_EQ(f["status"], "invalid");
  EXPECT_TRUE(contains(f["diag"], "LISTEN_FDS=\"one\"")) << f["diag"];
  EXPECT_EQ(f["count"], "0");
  EXPECT_EQ(f["env_unset"], "1");
}

TEST_F(SystemdListenFds, NameCountMismatchMarksCloexecTakesNothing) {
  auto f = run({"LISTEN_FDS=1", "LISTEN_FDNAMES=web:admin"}, {"self"});
  EXPECT_EQ(f["status"], "invalid");
  EXPECT_TRUE(contains(f["diag"], "more names")) << f["diag"];
  EXPECT_EQ(f["count"], "0");
  EXPECT_EQ(f["fd3_open"], "1");
  EXPECT_EQ(f["cloexec_after"], "1");  // ours, so it must not leak into our children
}

TEST_F(SystemdListenFds, DescriptorNotOpenReported) {
  // fds 3 (the listener) and 4 (the readiness pipe) exist; 5..7 do not.
  auto f = run({"LISTEN_FDS=5"}, {"self"});
  EXPECT_EQ(f["status"], "invalid");
  EXPECT_TRUE(contains(f["diag"], "descriptor 5 is not open")) << f["diag"];
  EXPECT_EQ(f["count"], "0");
}

// ---- passing listeners to a child by the convention ----

// Started by spawn_activated(): reports its pid and what it inherited, then answers one
// connection on fd 3 with its pid.
SOCKSHARE_HELPER(handoff_activated_child) {
  const char* listen_pid = std::getenv("LISTEN_PID");
  const std::string pid_text = listen_pid != nullptr ? listen_pid : "unset";
  const char* notify = std::getenv("NOTIFY_SOCKET");
  std::string fds;
  for (int fd : test::open_fds()) {
    if (fd > 2) fds += (fds.empty() ? "" : ",") + std::to_string(fd);
  }
  auto result = systemd::listen_fds_from_environment();
  std::string line = "pid=" + std::to_string(::getpid()) + " listen_pid=" + pid_text +
                     " status=" + std::string(result.status == ListenStatus::activated ? "activated" : "other") +
                     " count=" + std::to_string(result.sockets.size()) +
                     " notify=" + std::string(notify != nullptr ? "set" : "unset") + " fds=" + fds;
  for (auto& s : result.sockets) line += " name=" + s.name;
  ctx.ready(line);
  if (result.sockets.empty()) return 2;
  Fd conn(::accept4(result.sockets[0].fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!conn.valid()) return 3;
  set_nonblocking(conn.borrow(), false);
  const std::string reply = "served by " + std::to_string(::getpid()) + "\n";
  return ::send(conn.get(), reply.data(), reply.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(reply.size()) ? 0 : 4;
}

// Reads one line from `fd` within 20 s ("" on EOF or timeout).
std::string read_line(int fd) {
  std::string out;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  char c = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    const ssize_t n = ::read(fd, &c, 1);
    if (n <= 0) break;
    if (c == '\n') break;
    out += c;
  }
  return out;
}

// Reaps a spawn_activated() child even when an assertion fails first.
struct Reaper {
  pid_t pid;
  ~Reaper() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

class SystemdActivation : public test::FdLeakTest {};

TEST_F(SystemdActivation, ChildSeesItsOwnPidAndAcceptsOnFd3) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"), {.nonblocking = false});
  const Endpoint ep = local_endpoint(listener.borrow());
  auto [ready_read, ready_write] = test::make_pipe();
  // A descriptor opened without close-on-exec must not reach the child all the same.
  auto [stray_read, stray_write] = test::make_pipe(false);

  std::vector<std::string> env;
  for (auto& e : systemd::ActivationLayout::current_environment()) {
    if (!e.starts_with("SOCKSHARE_TEST_READY_FD=")) env.push_back(e);
  }
  env.push_back("SOCKSHARE_TEST_READY_FD=4");  // right after the one listener
  env.push_back("NOTIFY_SOCKET=/nonexistent/notify");
  env.push_back("LISTEN_FDS=99");  // stale values from our own activation are replaced
  const systemd::PassedListener passed[] = {{listener.borrow(), "web"}};
  const BorrowedFd extra[] = {ready_write.borrow()};
  systemd::ActivationLayout layout(passed, env, extra);
  EXPECT_EQ(layout.descriptor_count(), 2u);

  auto child = systemd::spawn_activated(
      {test::self_exe(), "--sockshare-helper", "handoff_activated_child"}, layout);
  Reaper reaper{child.pid};
  ready_write.reset();
  EXPECT_TRUE(child.pidfd.valid());

  auto f = fields(read_line(ready_read.get()));
  EXPECT_EQ(f["pid"], std::to_string(child.pid));
  EXPECT_EQ(f["listen_pid"], std::to_string(child.pid));
  EXPECT_EQ(f["status"], "activated");
  EXPECT_EQ(f["count"], "1");
  EXPECT_EQ(f["name"], "web");
  EXPECT_EQ(f["notify"], "unset");
  EXPECT_EQ(f["fds"], "3,4");  // the listener, the readiness pipe, nothing else

  Fd client = connect_to(ep);
  EXPECT_EQ(read_line(client.get()), "served by " + std::to_string(child.pid));
  EXPECT_EQ(reaper.wait(), 0);
}

TEST_F(SystemdActivation, ExecFailureReportedToTheParent) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const systemd::PassedListener passed[] = {{listener.borrow(), "web"}};
  systemd::ActivationLayout layout(passed, {});
  try {
    (void)systemd::spawn_activated({"/nonexistent/program"}, layout);
    FAIL() << "spawning a missing program succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ENOENT) << e.what();
  }
}

TEST(SystemdActivationLayout, RejectsInvalidNames) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const systemd::PassedListener bad[] = {{listener.borrow(), "a:b"}};
  EXPECT_THROW(systemd::ActivationLayout(bad, {}), Error);
}

// ---- sd_notify ----

// A private directory for socket files, removed with everything in it.
struct TempDir {
  std::string path;
  TempDir() {
    char pattern[] = "/tmp/sockshare-handoff-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = pattern;
  }
  ~TempDir() {
    for (const char* name : {"notify", "gone"}) ::unlink((path + "/" + name).c_str());
    ::rmdir(path.c_str());
  }
};

// Sets an environment variable for one test and restores the old state.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(std::string n, const std::optional<std::string>& value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    if (value) ::setenv(name.c_str(), value->c_str(), 1);
    else ::unsetenv(name.c_str());
  }
  ~ScopedEnv() {
    if (old) ::setenv(name.c_str(), old->c_str(), 1);
    else ::unsetenv(name.c_str());
  }
};

// The manager's side: a datagram socket bound to a path or an abstract name.
Fd bind_datagram(const std::string& address) {
  Fd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, address.data(), address.size());
  if (address[0] == '@') sun.sun_path[0] = '\0';
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size() +
                                          (address[0] == '@' ? 0 : 1));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sun), len) != 0) {
    throw std::runtime_error("bind " + address + ": " + std::strerror(errno));
  }
  return fd;
}

struct Datagram {
  std::string text;
  std::vector<Fd> fds;
};

Datagram receive_datagram(int fd) {
  Datagram out;
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 5000) != 1) return out;
  char buffer[4096];
  iovec iov{buffer, sizeof buffer};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  const ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  if (n < 0) return out;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int received = -1;
      std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      out.fds.emplace_back(received);
    }
  }
  out.text.assign(buffer, static_cast<std::size_t>(n));
  return out;
}

std::uint64_t inode_of(int fd) {
  struct stat st {};
  ::fstat(fd, &st);
  return st.st_ino;
}

class SystemdNotify : public test::FdLeakTest {};

TEST_F(SystemdNotify, NoOpWithoutNotifySocket) {
  ScopedEnv env("NOTIFY_SOCKET", std::nullopt);
  EXPECT_FALSE(systemd::notify_ready());
  EXPECT_FALSE(systemd::notify_stopping());
}

TEST_F(SystemdNotify, ReadyStatusStoppingMainPidToAPath) {
  TempDir dir;
  const std::string path = dir.path + "/notify";
  Fd manager = bind_datagram(path);
  ScopedEnv env("NOTIFY_SOCKET", path);
  EXPECT_TRUE(systemd::notify_ready("serving 2 listeners"));
  EXPECT_EQ(receive_datagram(manager.get()).text, "READY=1\nSTATUS=serving 2 listeners");
  EXPECT_TRUE(systemd::notify_status("draining"));
  EXPECT_EQ(receive_datagram(manager.get()).text, "STATUS=draining");
  EXPECT_TRUE(systemd::notify_main_pid(4321));
  EXPECT_EQ(receive_datagram(manager.get()).text, "MAINPID=4321");
  EXPECT_TRUE(systemd::notify_stopping());
  EXPECT_EQ(receive_datagram(manager.get()).text, "STOPPING=1");
  EXPECT_TRUE(systemd::notify_reloading());
  EXPECT_TRUE(receive_datagram(manager.get()).text.starts_with("RELOADING=1\nMONOTONIC_USEC="));
  EXPECT_THROW(systemd::notify_status("two\nlines"), Error);
}

TEST_F(SystemdNotify, FdStoreSendsDescriptorsWithName) {
  const std::string name = "@sockshare-handoff-notify-" + std::to_string(::getpid());
  Fd manager = bind_datagram(name);
  ScopedEnv env("NOTIFY_SOCKET", name);
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  auto [pipe_read, pipe_write] = test::make_pipe();
  const BorrowedFd fds[] = {listener.borrow(), pipe_read.borrow()};
  EXPECT_TRUE(systemd::store_fds(fds, "web"));
  Datagram d = receive_datagram(manager.get());
  EXPECT_EQ(d.text, "FDSTORE=1\nFDNAME=web");
  ASSERT_EQ(d.fds.size(), 2u);
  EXPECT_EQ(inode_of(d.fds[0].get()), inode_of(listener.get()));
  EXPECT_EQ(inode_of(d.fds[1].get()), inode_of(pipe_read.get()));
  EXPECT_THROW(systemd::store_fds(fds, "bad:name"), Error);
}

TEST_F(SystemdNotify, UnusableOrDeadNotifySocketIsAnError) {
  {
    ScopedEnv env("NOTIFY_SOCKET", std::string("relative/path"));
    try {
      systemd::notify_ready();
      FAIL() << "relative NOTIFY_SOCKET accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_input);
    }
  }
  TempDir dir;
  const std::string path = dir.path + "/gone";
  { Fd bound = bind_datagram(path); }  // the file stays, nobody reads it
  ScopedEnv env("NOTIFY_SOCKET", path);
  try {
    systemd::notify_ready();
    FAIL() << "notify to a dead socket succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ECONNREFUSED) << e.what();
  }
}

}  // namespace
}  // namespace sockshare
