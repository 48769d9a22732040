// Helper processes for the grant tests. Each is this test binary re-executed by name.
#include <linux/capability.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include <condition_variable>
#include <fstream>
#include <sstream>

#include "grant_support.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/spawn.hpp"

namespace sockshare {
namespace {

using namespace grant_test;

std::string int_option(int fd, int level, int name) {
  int value = 0;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, level, name, &value, &len) != 0) return "?";
  return std::to_string(value);
}

// Drops CAP_SYS_PTRACE from the effective set, so ptrace rules apply to this process as to
// an unprivileged one (pidfd_getfd on a non-dumpable source is then refused).
bool drop_ptrace_capability() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  data[CAP_SYS_PTRACE / 32].effective &= ~(1U << (CAP_SYS_PTRACE % 32));
  return ::syscall(SYS_capset, &header, data) == 0;
}

}  // namespace

// args: how the info arrives ("pipe": the first line on fd 3; "file": that line is a path),
// then "slow", "fast", "direct" or "direct-only" (direct without fallback to the channel),
// each optionally with "-nocap" (without CAP_SYS_PTRACE). Reports "ok <inode> <cookie>" or
// "err <kind> <what>", then obeys command lines on fd 3 until it closes.
SOCKSHARE_HELPER(redeemer) {
  Fd control = ctx.take_fd(0);
  const std::string how = ctx.args().at(0);
  const std::string speed = ctx.args().at(1);
  const bool direct = speed.rfind("direct", 0) == 0;
  const bool direct_only = speed.rfind("direct-only", 0) == 0;
  const bool nocap = speed.size() > 6 && speed.substr(speed.size() - 6) == "-nocap";
  if (nocap && !drop_ptrace_capability()) return 3;
  ctx.ready("waiting");
  std::string line = read_line(control.borrow());
  if (how == "file") {
    std::ifstream file(line);
    std::getline(file, line);
  }
  Fd socket;
  try {
    socket = redeem(SocketInfo::parse(line), {.fast_path = speed.rfind("fast", 0) == 0,
                                              .direct = direct,
                                              .direct_fallback = !direct_only});
  } catch (const Error& e) {
    ctx.ready("err " + std::string(to_string(e.kind())) + " " + e.what());
    // Stay alive until told to go, so the test controls when this pid disappears.
    while (!read_line(control.borrow()).empty()) {
    }
    return 0;
  }
  const SocketIdentity id = identify(socket.borrow());
  ctx.ready("ok " + std::to_string(id.inode) + " " + std::to_string(id.cookie));
  for (;;) {
    const std::string command = read_line(control.borrow());
    if (command.empty()) return 0;
    const int fd = socket.get();
    if (command == "echo") {
      char buffer[256];
      const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
      write_all(socket.borrow(),
                "echo:" + std::string(buffer, n > 0 ? static_cast<std::size_t>(n) : 0));
      ctx.ready("echoed");
    } else if (command.rfind("write ", 0) == 0) {
      write_all(socket.borrow(), command.substr(6));
      ctx.ready("written");
    } else if (command == "close") {
      socket.reset();
      ctx.ready("closed");
    } else if (command == "options") {
      ctx.ready(int_option(fd, SOL_SOCKET, SO_RCVBUF) + " " +
                int_option(fd, SOL_SOCKET, SO_KEEPALIVE) + " " +
                int_option(fd, IPPROTO_TCP, TCP_NODELAY));
    } else if (command == "setflags") {
      // O_NONBLOCK lives on the open file description (shared); FD_CLOEXEC on this
      // descriptor only (per process, per descriptor).
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
      ::fcntl(fd, F_SETFD, 0);
      const int size = 6000;
      ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
      ctx.ready("set");
    } else if (command == "shutdown") {
      ::shutdown(fd, SHUT_WR);
      ctx.ready("shut");
    } else if (command == "epollout") {
      Fd ep(::epoll_create1(EPOLL_CLOEXEC));
      epoll_event ev{};
      ev.events = EPOLLOUT;
      ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, fd, &ev);
      ctx.ready("registered");
      epoll_event out{};
      const int n = ::epoll_wait(ep.get(), &out, 1, 5000);
      ctx.ready(n == 1 && (out.events & EPOLLOUT) ? "writable" : "not writable");
    } else {
      ctx.ready("unknown command " + command);
    }
  }
}

// Started by spawn_with_socket (no readiness pipe): redeems the inherited info and writes
// "<passing> fds=<list>" through the socket, listing descriptors above 2 other than the
// redeemed socket. The test expects exactly those the test process itself holds without
// close-on-exec (inherited from whoever started it): nothing of the library's leaked (R7).
SOCKSHARE_HELPER(spawned_redeemer) {
  const std::string passing = ctx.args().at(0);
  const SocketInfo info =
      passing == "argument" ? SocketInfo::parse(ctx.args().back()) : inherited_info();
  Fd socket = redeem(info);
  std::string others;
  for (int fd : test::open_fds()) {
    if (fd > 2 && fd != socket.get()) others += std::to_string(fd) + ",";
  }
  write_all(socket.borrow(), passing + " fds=" + others);
  return 0;
}

// args: target pid, "dumpable" | "nondumpable" | "exit" | "hold", and optionally "direct"
// (a direct grant). Grants one end of a unix stream pair to the target and reports
// "info <text>". "exit" then exits; "hold" reports a second "info <text>" for the same
// target and exits when fd 3 reaches end of file; the others wait for the outcome and
// report "done <outcome> fast=<n>" after writing "hello" into their end of the pair.
SOCKSHARE_HELPER(grant_source) {
  const pid_t target = static_cast<pid_t>(std::stol(ctx.args().at(0)));
  const std::string mode = ctx.args().at(1);
  const bool direct = ctx.args().size() > 2 && ctx.args().at(2) == "direct";
  if (mode == "nondumpable" && ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return 3;
  // Under Yama ptrace_scope 1 only a declared tracer may use pidfd_getfd on us.
  if (mode != "nondumpable") (void)::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  EventLog log;
  GrantServer server({.on_event = log.callback()});
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 4;
  Fd mine(sv[0]);
  Fd theirs(sv[1]);
  const GrantOptions options{.ttl = std::chrono::seconds(30), .direct = direct};
  const SocketInfo info = server.duplicate(theirs.borrow(), Target::pid(target), options);
  ctx.ready("info " + info.format());
  if (mode == "exit") return 0;
  if (mode == "hold") {
    Fd control = ctx.take_fd(0);
    ctx.ready("info " + server.duplicate(theirs.borrow(), Target::pid(target), options).format());
    (void)read_line(control.borrow());
    return 0;
  }
  theirs.reset();
  if (!log.wait_for(1)) return 5;
  auto events = log.take();
  write_all(mine.borrow(), "hello");
  ctx.ready("done " + std::string(to_string(events.at(0).outcome)) +
            " fast=" + std::to_string(server.stats().fast_path));
  return 0;
}

// args: abstract name. Binds it first, like a process squatting a grant endpoint (R18), and
// reports whether a redeemer ever showed it a token.
SOCKSHARE_HELPER(squatter) {
  auto listener = ChannelListener::listen(parse_endpoint("unix:@" + ctx.args().at(0)));
  ctx.ready("bound");
  Channel channel = listener.accept(std::chrono::seconds(10));
  try {
    Message m = channel.receive({.max_fds = 0}, std::chrono::seconds(5));
    ctx.ready("token");
  } catch (const Error& e) {
    ctx.ready(e.kind() == ErrorKind::peer_gone ? "nothing" : "error");
  }
  return 0;
}

// S6 worker: for each info line on fd 3, redeems the connection, answers one request with
// "served:<request>" and closes it.
SOCKSHARE_HELPER(worker) {
  Fd control = ctx.take_fd(0);
  ctx.ready("worker");
  for (;;) {
    const std::string line = read_line(control.borrow());
    if (line.empty()) return 0;
    Fd connection = redeem(SocketInfo::parse(line));
    char buffer[128];
    const ssize_t n = ::recv(connection.get(), buffer, sizeof buffer, 0);
    write_all(connection.borrow(),
              "served:" + std::string(buffer, n > 0 ? static_cast<std::size_t>(n) : 0));
    ctx.ready("served");
  }
}

}  // namespace sockshare
