// Time to hand N listeners (1, 16, 253) from an old generation to a new one with the
// handoff protocol, against a raw SCM_RIGHTS transfer of the same descriptors between the
// same two processes, measured in the same run.
//
//   handoff_bench [--quick]
//
// The old generation is a forked child. Handoff: the parent (the new generation) times
// HandoffClient::connect + receive + commit, i.e. connect, identity checks on both sides,
// hello, the batches with metadata, per-descriptor validation, ack and release; the holder's
// HandoffServer is set up before the clock starts. Raw: the parent times one request byte
// to the child, the child's sendmsg of the N descriptors in one SCM_RIGHTS message, and
// the parent's recvmsg. Raw and handoff runs alternate so drift on a shared machine hits
// both alike. Prints medians and the ratio handoff/raw. docs/benchmarks/handoff.md records
// results.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sockshare/handoff.hpp"

namespace {

using namespace sockshare;
using Clock = std::chrono::steady_clock;

constexpr std::array<std::size_t, 3> kCounts = {1, 16, 253};
constexpr unsigned kWholeRunAlarm = 30;  // seconds: the program never outlives its bound

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "handoff_bench: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

void write_byte(int fd) {
  const char c = 'x';
  if (::write(fd, &c, 1) != 1) die("write");
}

void read_byte(int fd) {
  char c = 0;
  if (::read(fd, &c, 1) != 1) die("read");
}

// The old generation: for each handoff run a fresh HandoffServer (a server that handed
// over serves no more), ready byte, serve; for each raw run: request byte -> descriptors.
[[noreturn]] void old_generation(const std::vector<Fd>& listeners, int runs, int ready_fd,
                                 int raw_fd, const std::string& base) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  std::vector<int> raw(listeners.size());
  for (std::size_t i = 0; i < listeners.size(); ++i) raw[i] = listeners[i].get();
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * 253)> control{};
  auto serve_handoff = [&](int run) {
    Endpoint ep;
    ep.kind = Endpoint::Kind::unix_abstract;
    ep.path = base + "-" + std::to_string(run);
    handoff::HandoffServerOptions options;
    options.hand_over_control = false;  // the same descriptors as the raw transfer
    auto server = handoff::HandoffServer::listen(ep, options);
    for (std::size_t i = 0; i < listeners.size(); ++i) {
      server.add("l" + std::to_string(i), listeners[i].borrow());
    }
    write_byte(ready_fd);
    auto outcome = server.serve(std::chrono::seconds(10));
    if (outcome.result != handoff::ServeResult::handed_over) {
      std::fprintf(stderr, "handoff_bench: handoff %s: %s\n",
                   std::string(to_string(outcome.result)).c_str(), outcome.detail.c_str());
      std::_Exit(2);
    }
  };
  auto serve_raw = [&] {
    read_byte(raw_fd);
    char byte = 'f';
    iovec iov{&byte, 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * raw.size());
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * raw.size());
    std::memcpy(CMSG_DATA(cmsg), raw.data(), sizeof(int) * raw.size());
    if (::sendmsg(raw_fd, &msg, MSG_NOSIGNAL) != 1) die("sendmsg");
  };
  // The order alternates with the parent's: each variant runs first half of the time.
  for (int run = 0; run < runs; ++run) {
    if (run % 2 == 0) {
      serve_handoff(run);
      serve_raw();
    } else {
      serve_raw();
      serve_handoff(run);
    }
  }
  std::_Exit(0);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double best(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

// The first two CPUs this process may use, so old and new generation each get their own:
// unpinned, the pair sometimes shares one core and the figures flip between two modes.
std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

void pin(const std::vector<int>& cpus, std::size_t index) {
  if (cpus.size() < 2) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpus[index], &set);
  ::sched_setaffinity(0, sizeof set, &set);
}

struct Row {
  std::size_t count;
  int runs;
  double handoff_us;
  double raw_us;
  double handoff_best_us;
  double raw_best_us;
};

Row measure(std::size_t count, int runs) {
  std::vector<Fd> listeners;
  for (std::size_t i = 0; i < count; ++i) listeners.push_back(listen_on(parse_endpoint("127.0.0.1:0")));
  int ready[2];
  int raw[2];
  if (::pipe2(ready, O_CLOEXEC) != 0) die("pipe2");
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, raw) != 0) die("socketpair");
  const std::string base = "sockshare-handoff-bench-" + std::to_string(::getpid()) + "-" + std::to_string(count);
  const std::vector<int> cpus = allowed_cpus();
  const pid_t child = ::fork();
  if (child < 0) die("fork");
  if (child == 0) {
    pin(cpus, 1);
    ::close(ready[0]);
    ::close(raw[0]);
    old_generation(listeners, runs, ready[1], raw[1], base);
  }
  pin(cpus, 0);
  ::close(ready[1]);
  ::close(raw[1]);
  listeners.clear();  // the new generation holds only what it receives

  std::vector<double> handoff_us;
  std::vector<double> raw_us;
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * 253)> control{};
  auto take = [&](int run) {
    read_byte(ready[0]);
    Endpoint ep;
    ep.kind = Endpoint::Kind::unix_abstract;
    ep.path = base + "-" + std::to_string(run);
    const auto t0 = Clock::now();
    auto client = handoff::HandoffClient::connect(ep);
    auto takeover = client.receive();
    if (!client.commit() || takeover.listeners.size() != count) {
      std::fprintf(stderr, "handoff_bench: incomplete handoff\n");
      std::exit(1);
    }
    const auto t1 = Clock::now();
    handoff_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  };
  auto take_raw = [&] {
    const auto t0 = Clock::now();
    write_byte(raw[0]);
    char byte = 0;
    iovec iov{&byte, 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    if (::recvmsg(raw[0], &msg, MSG_CMSG_CLOEXEC) != 1) die("recvmsg");
    const auto t1 = Clock::now();
    raw_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    std::size_t got = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < n; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        ::close(fd);
        ++got;
      }
    }
    if (got != count) {
      std::fprintf(stderr, "handoff_bench: raw transfer delivered %zu of %zu\n", got, count);
      std::exit(1);
    }
  };
  for (int run = 0; run < runs; ++run) {
    if (run % 2 == 0) {
      take(run);
      take_raw();
    } else {
      take_raw();
      take(run);
    }
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(ready[0]);
  ::close(raw[0]);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "handoff_bench: old generation failed (status %d)\n", status);
    std::exit(1);
  }
  return {count, runs, median(handoff_us), median(raw_us), best(handoff_us), best(raw_us)};
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  ::alarm(kWholeRunAlarm);
  std::printf("%-10s %6s | %13s %13s %7s | %13s %13s %7s\n", "listeners", "runs",
              "handoff med", "raw SCM med", "ratio", "handoff best", "raw SCM best", "ratio");
  for (std::size_t count : kCounts) {
    const int runs = quick ? 20 : (count >= 253 ? 300 : 1000);
    const Row row = measure(count, runs);
    std::printf("%-10zu %6d | %10.1f us %10.1f us %6.1fx | %10.1f us %10.1f us %6.1fx\n",
                row.count, row.runs, row.handoff_us, row.raw_us, row.handoff_us / row.raw_us,
                row.handoff_best_us, row.raw_best_us, row.handoff_best_us / row.raw_best_us);
  }
  std::printf("handoff = connect + identity checks + hello + batches with metadata + "
              "per-descriptor validation + ack + release; raw = request byte + one sendmsg "
              "of the same descriptors + recvmsg\n");
  return 0;
}
