// Redemption latency and rate, against the raw mechanisms measured in the same run:
//   raw SCM_RIGHTS round trip: request byte -> reply carrying one descriptor (the least any
//                              pull-style handoff between two processes can cost)
//   raw pidfd_getfd:           pidfd_getfd + close in the target
//   fast-path step:            what the fast path does in place of receiving the descriptor:
//                              pidfd_getfd + the identity/cookie check + close
//   redeem (SCM_RIGHTS):       redeem(info): connect, identity checks both ways, token,
//                              descriptor, cookie check, ack
//   redeem (fast path):        the same with pidfd_getfd instead of SCM_RIGHTS
//   redeem, direct (first):    redeem(info, {.direct = true}) with an empty source-pidfd
//                              cache: local checks, pidfd_open + identity of the source,
//                              pidfd_getfd, cookie and kind check; no message at all
//   redeem, direct (cached):   the same with the source's pidfd cached (steady state):
//                              local checks, pidfd_getfd, one getsockopt (SO_COOKIE)
//   direct, cached, new socket: the same, but every grant is for a socket not redeemed
//                              before, so its kind is read too (three more getsockopt)
// Both direct rows include the close, like the raw pidfd_getfd row they are compared with.
// The source runs in the parent, the target in a forked child; the child measures and prints.
// With two or more CPUs the source (and its serving thread) is pinned to one CPU and the
// target to another, so every figure is a cross-core one: unpinned, the raw ping-pong may
// land both processes on one core (a few us) while the three-party redemption cannot,
// and the ratios would compare different things.
// Usage: grant_bench [iterations]   (default 2000; bounded well under 60 s)
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "linux/pidfd.hpp"
#include "linux/sys.hpp"
#include "sockshare/grant.hpp"

namespace {

using namespace sockshare;
using Clock = std::chrono::steady_clock;

constexpr int kBatch = 32;  // grants in flight per batch, below the per-target quota

struct Summary {
  double p50_us = 0;
  double p99_us = 0;
  double per_second = 0;
};

Summary summarize(std::vector<double>& us, double total_seconds) {
  std::sort(us.begin(), us.end());
  Summary s;
  s.p50_us = us[us.size() / 2];
  s.p99_us = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  s.per_second = static_cast<double>(us.size()) / total_seconds;
  return s;
}

double since_us(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

void send_fd(int sock, int fd) {
  char byte = 'f';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != 1) std::abort();
}

int receive_fd(int sock) {
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  if (::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1) std::abort();
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof fd);
  return fd;
}

void write_exact(int fd, const void* data, std::size_t n) {
  if (::send(fd, data, n, MSG_NOSIGNAL) != static_cast<ssize_t>(n)) std::abort();
}

void read_exact(int fd, void* data, std::size_t n) {
  if (::recv(fd, data, n, MSG_WAITALL) != static_cast<ssize_t>(n)) std::abort();
}

// ---- the target (child): measures -------------------------------------------------------

int run_target(int control, int raw, int iterations) {
  // The source's socket number, for raw pidfd_getfd.
  int number = -1;
  read_exact(control, &number, sizeof number);
  Fd source = pidfd::open(::getppid());

  // 1. raw SCM_RIGHTS round trip
  std::vector<double> raw_rt;
  auto start = Clock::now();
  for (int i = 0; i < iterations + 100; ++i) {
    const auto t = Clock::now();
    write_exact(raw, "r", 1);
    Fd got(receive_fd(raw));
    if (i >= 100) raw_rt.push_back(since_us(t));
    if (i == 99) start = Clock::now();
  }
  Summary s_raw = summarize(raw_rt, std::chrono::duration<double>(Clock::now() - start).count());
  write_exact(raw, "q", 1);

  // 2. raw pidfd_getfd
  std::vector<double> raw_getfd;
  const int getfd_rounds = iterations * 10;
  start = Clock::now();
  for (int i = 0; i < getfd_rounds; ++i) {
    const auto t = Clock::now();
    pidfd::GetFdResult r = pidfd::get_fd(source.borrow(), number);
    if (!r.fd.valid()) {
      std::printf("pidfd_getfd refused (%s): fast-path figures below fall back\n",
                  std::strerror(r.error));
      break;
    }
    r.fd.reset();
    raw_getfd.push_back(since_us(t));
  }
  Summary s_getfd{};
  if (!raw_getfd.empty()) {
    s_getfd = summarize(raw_getfd, std::chrono::duration<double>(Clock::now() - start).count());
  }

  // 2b. the fast path's own step inside a redemption: pidfd_getfd, then the identity check
  // redeem() makes (fstat + SO_DOMAIN/TYPE/PROTOCOL/ACCEPTCONN/COOKIE), then close.
  std::vector<double> take;
  start = Clock::now();
  for (int i = 0; i < getfd_rounds && !raw_getfd.empty(); ++i) {
    const auto t = Clock::now();
    pidfd::GetFdResult r = pidfd::get_fd(source.borrow(), number);
    if (!r.fd.valid() || !identify(r.fd.borrow()).is_socket) std::abort();
    r.fd.reset();
    take.push_back(since_us(t));
  }
  Summary s_take{};
  if (!take.empty()) {
    s_take = summarize(take, std::chrono::duration<double>(Clock::now() - start).count());
  }

  // 3 and 4. redemptions, batch by batch: the source sends kBatch infos, we redeem them all.
  // 5 and 6. direct redemptions the same way ("d": the source makes direct grants), first
  // with the source-pidfd cache emptied before every redemption, then with it warm.
  enum Kind { channel, fast_path, direct_first, direct_cached, direct_new_socket, kKinds };
  Summary s_redeem[kKinds];
  DirectSourceCache cache;
  for (int kind = 0; kind < kKinds; ++kind) {
    const bool direct = kind >= direct_first;
    std::vector<double> lat;
    double busy = 0;
    const int batches = (iterations + kBatch - 1) / kBatch + 1;  // the first one warms up
    for (int b = 0; b < batches; ++b) {
      // Ask for a batch: "g" channel grants, "d" direct grants, "n" direct grants each for
      // a new socket.
      write_exact(control, kind == direct_new_socket ? "n" : direct ? "d" : "g", 1);
      std::vector<SocketInfo> infos(kBatch);
      for (auto& info : infos) {
        std::array<std::byte, SocketInfo::kBinarySize> bytes{};
        read_exact(control, bytes.data(), bytes.size());
        info = SocketInfo::from_bytes(bytes);
      }
      const RedeemOptions options{.timeout = std::chrono::seconds(5),
                                  .fast_path = kind == fast_path,
                                  .direct = direct,
                                  .direct_fallback = false,
                                  .sources = &cache};
      double batch_busy = 0;
      for (const auto& info : infos) {
        if (kind == direct_first) cache.clear();
        const auto t = Clock::now();
        if (direct) {
          { Fd socket = redeem(info, options); }  // closed inside the timing, as in the raw row
          lat.push_back(since_us(t));
        } else {
          Fd socket = redeem(info, options);
          lat.push_back(since_us(t));
        }
        batch_busy += lat.back() / 1e6;
      }
      if (b == 0) {
        lat.clear();  // warm-up
      } else {
        busy += batch_busy;
      }
    }
    s_redeem[kind] = summarize(lat, busy);
  }
  write_exact(control, "x", 1);

  std::printf("%-34s %10s %10s %14s\n", "operation", "p50 us", "p99 us", "per second");
  auto row = [](const char* name, const Summary& s) {
    std::printf("%-34s %10.2f %10.2f %14.0f\n", name, s.p50_us, s.p99_us, s.per_second);
  };
  row("raw SCM_RIGHTS round trip (1 fd)", s_raw);
  row("raw pidfd_getfd + close", s_getfd);
  row("fast-path step: getfd + identity", s_take);
  row("redeem, SCM_RIGHTS path", s_redeem[0]);
  row("redeem, pidfd_getfd fast path", s_redeem[fast_path]);
  row("redeem, direct (first from source)", s_redeem[direct_first]);
  row("redeem, direct (cached pidfd)", s_redeem[direct_cached]);
  row("direct, cached, new socket", s_redeem[direct_new_socket]);
  std::printf("\nratio redeem / raw round trip (p50):             %6.2f  (target <= 2.5)\n",
              s_redeem[channel].p50_us / s_raw.p50_us);
  std::printf("ratio fast-path redeem / raw round trip (p50):   %6.2f\n",
              s_redeem[fast_path].p50_us / s_raw.p50_us);
  if (s_getfd.p50_us > 0) {
    std::printf("ratio fast-path redeem / raw pidfd_getfd (p50):  %6.2f\n",
                s_redeem[fast_path].p50_us / s_getfd.p50_us);
    std::printf("ratio fast-path step / raw pidfd_getfd (p50):    %6.2f\n",
                s_take.p50_us / s_getfd.p50_us);
    std::printf("ratio direct, first / raw pidfd_getfd (p50):     %6.2f\n",
                s_redeem[direct_first].p50_us / s_getfd.p50_us);
    std::printf("ratio direct, cached / raw pidfd_getfd (p50):    %6.2f  (target <= 3)\n",
                s_redeem[direct_cached].p50_us / s_getfd.p50_us);
    std::printf("ratio direct, new socket / raw pidfd_getfd (p50): %5.2f\n",
                s_redeem[direct_new_socket].p50_us / s_getfd.p50_us);
  }
  std::fflush(stdout);
  return 0;
}

// ---- the source (parent): serves ---------------------------------------------------------

int run_source(int control, int raw, pid_t child, int iterations) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 1;
  Fd shared(sv[0]);
  Fd other(sv[1]);
  const int number = shared.get();
  write_exact(control, &number, sizeof number);

  for (;;) {
    char c = 0;
    read_exact(raw, &c, 1);
    if (c == 'q') break;
    send_fd(raw, shared.get());
  }

  GrantServer server({.max_grants_per_target = kBatch});
  Fd target = pidfd::open(child);
  // Direct grants stay in the table until they expire (the source never hears of a direct
  // redemption); revoke the previous batch's before making the next, as a source that knows
  // its target is done would, so the quota holds.
  std::vector<SocketInfo> direct_batch;
  std::vector<Fd> fresh;  // the "n" batches' sockets, one per grant
  for (;;) {
    char c = 0;
    read_exact(control, &c, 1);
    if (c == 'x') break;
    for (const auto& info : direct_batch) (void)server.revoke(info);
    direct_batch.clear();
    fresh.clear();
    const GrantOptions options{.direct = c == 'd' || c == 'n'};
    for (int i = 0; i < kBatch; ++i) {
      BorrowedFd socket = shared.borrow();
      if (c == 'n') {
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) return 1;
        fresh.emplace_back(pair[0]);
        fresh.emplace_back(pair[1]);
        socket = fresh.back().borrow();
      }
      const SocketInfo info = server.duplicate(socket, Target::pidfd(target.borrow()), options);
      if (options.direct) direct_batch.push_back(info);
      const auto bytes = info.to_bytes();
      write_exact(control, bytes.data(), bytes.size());
    }
  }
  (void)iterations;
  return 0;
}

// Pins the calling process (and the threads it creates later) to `cpu`; false if it cannot.
bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(0, sizeof set, &set) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(100, std::min(20000, std::atoi(argv[1]))) : 2000;
  int control[2];
  int raw[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, control) != 0 ||
      ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, raw) != 0) {
    std::perror("socketpair");
    return 1;
  }
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ::sched_getaffinity(0, sizeof allowed, &allowed);
  int cpus[2] = {-1, -1};
  for (int c = 0, found = 0; c < CPU_SETSIZE && found < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus[found++] = c;
  }
  const bool pinned = cpus[1] >= 0;
  std::printf("grant_bench: %d iterations per measurement, source pid %d, %s\n", iterations,
              ::getpid(), pinned ? "source and target pinned to different CPUs" : "one CPU");
  std::fflush(stdout);
  // Forked before any thread exists, so the child may run ordinary code.
  const pid_t child = ::fork();
  if (child < 0) return 1;
  if (pinned) pin(child == 0 ? cpus[1] : cpus[0]);
  if (child == 0) {
    ::close(control[0]);
    ::close(raw[0]);
    try {
      ::_exit(run_target(control[1], raw[1], iterations));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "target: %s\n", e.what());
      ::_exit(1);
    }
  }
  ::close(control[1]);
  ::close(raw[1]);
  int rc = 0;
  try {
    rc = run_source(control[0], raw[0], child, iterations);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "source: %s\n", e.what());
    rc = 1;
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return rc != 0 ? rc : (WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}
