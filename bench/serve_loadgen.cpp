// Open-loop HTTP load generator for bench/serve_bench.sh, scenario 2 (uneven work) and the
// CPU-per-connection check of scenario 1. wrk is closed-loop: each connection sends its next
// request only when the previous one is answered, so a slow server slows the load down and the
// requests that would have waited are never sent (coordinated omission). Here request i is due
// at start + i / rate whatever happens to the others, on a NEW CONNECTION, and its latency is
// measured from that due time to the end of the answer, so time spent queueing anywhere —
// in this program, the backlog, the dispatcher or behind a busy worker — is counted.
//
//   serve_loadgen --port P [--rate 400] [--duration 10] [--burn-percent 5] [--burn-ms 20]
//                 [--max-open 1000] [--timeout 10] [--seed 1] [--cpu-pids PID,PID...]
//
// Loopback only (127.0.0.1). Bounded: it stops sending after --duration seconds, waits at most
// --timeout seconds for the answers, and never holds more than --max-open connections (a due
// request that finds the limit reached is counted as "skipped", not sent late). Prints one
// block with latency percentiles overall, for the short requests and for the burning ones, and
// with --cpu-pids the CPU time (utime+stime) those processes used per completed request.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::int64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

struct Options {
  int port = 0;
  double rate = 400;
  double duration = 10;
  double burn_percent = 5;
  unsigned burn_ms = 20;
  std::size_t max_open = 1000;
  double timeout = 10;
  unsigned seed = 1;
  std::vector<int> cpu_pids;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "serve_loadgen: %s\nusage: serve_loadgen --port P [--rate R] [--duration S] "
               "[--burn-percent X] [--burn-ms N] [--max-open N] [--timeout S] [--seed N] "
               "[--cpu-pids PID,...]\n",
               why);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    const char* v = argv[++i];
    if (a == "--port") o.port = std::atoi(v);
    else if (a == "--rate") o.rate = std::atof(v);
    else if (a == "--duration") o.duration = std::atof(v);
    else if (a == "--burn-percent") o.burn_percent = std::atof(v);
    else if (a == "--burn-ms") o.burn_ms = static_cast<unsigned>(std::atoi(v));
    else if (a == "--max-open") o.max_open = static_cast<std::size_t>(std::atoi(v));
    else if (a == "--timeout") o.timeout = std::atof(v);
    else if (a == "--seed") o.seed = static_cast<unsigned>(std::atoi(v));
    else if (a == "--cpu-pids") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        if (!item.empty()) o.cpu_pids.push_back(std::atoi(item.c_str()));
      }
    } else {
      usage(("unknown option " + a).c_str());
    }
  }
  if (o.port <= 0 || o.port > 65535) usage("--port is required");
  if (o.rate <= 0 || o.rate > 100000) usage("--rate must be in (0, 100000]");
  if (o.duration <= 0 || o.duration > 120) usage("--duration must be in (0, 120]");
  if (o.timeout <= 0 || o.timeout > 60) usage("--timeout must be in (0, 60]");
  if (o.max_open == 0 || o.max_open > 20000) usage("--max-open must be in [1, 20000]");
  if (o.rate * o.duration > 1e6) usage("--rate times --duration must stay within 1000000 requests");
  return o;
}

long cpu_ticks(int pid) {  // utime + stime from /proc/PID/stat; -1 when the process is gone
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');
  if (close == std::string::npos) return -1;
  std::stringstream rest(text.substr(close + 2));
  std::string field;
  long utime = 0, stime = 0;
  for (int i = 3; rest >> field; ++i) {  // field 3 is the state
    if (i == 14) utime = std::atol(field.c_str());
    if (i == 15) {
      stime = std::atol(field.c_str());
      return utime + stime;
    }
  }
  return -1;
}

struct Request {
  int fd = -1;
  bool burn = false;
  bool sent = false;
  std::int64_t due = 0;
  std::size_t received = 0;
  bool ok = false;  // the answer began with "HTTP/1.1 200"
  char head[12] = {};
};

struct Result {
  std::vector<std::int64_t> short_ns, burn_ns;
  std::size_t errors = 0, skipped = 0, timeouts = 0, non_200 = 0;
};

double pct(std::vector<std::int64_t>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto at = static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  return static_cast<double>(v[std::min(at, v.size() - 1)]) / 1000.0;
}

void line(const char* name, std::vector<std::int64_t> v) {
  if (v.empty()) {
    std::printf("%-7s n=0\n", name);
    return;
  }
  const double p50 = pct(v, 50), p90 = pct(v, 90), p99 = pct(v, 99), p999 = pct(v, 99.9);
  std::printf("%-7s n=%zu p50_us=%.0f p90_us=%.0f p99_us=%.0f p99.9_us=%.0f max_us=%.0f\n", name,
              v.size(), p50, p90, p99, p999, static_cast<double>(v.back()) / 1000.0);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(o.port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

  const std::string short_req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  const std::string burn_req = "GET /burn?ms=" + std::to_string(o.burn_ms) +
                               " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> coin(0, 100);

  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) {
    std::perror("epoll_create1");
    return 1;
  }
  const auto total = static_cast<std::uint64_t>(o.rate * o.duration);
  std::vector<Request> reqs(total);
  Result res;
  std::size_t open = 0;
  std::uint64_t next = 0;
  const auto interval_ns = static_cast<std::int64_t>(1e9 / o.rate);
  std::vector<long> cpu_before;
  for (int pid : o.cpu_pids) cpu_before.push_back(cpu_ticks(pid));
  const std::int64_t start = now_ns() + 1'000'000;
  const std::int64_t give_up = start + static_cast<std::int64_t>((o.duration + o.timeout) * 1e9);
  std::vector<epoll_event> events(512);

  auto finish = [&](std::uint64_t i, bool completed, std::int64_t t) {
    Request& r = reqs[i];
    ::close(r.fd);
    r.fd = -1;
    --open;
    if (!completed) {
      ++res.errors;
      return;
    }
    if (!r.ok) ++res.non_200;
    (r.burn ? res.burn_ns : res.short_ns).push_back(t - r.due);
  };

  while (next < total || open > 0) {
    std::int64_t t = now_ns();
    if (t > give_up) break;
    // Start every request that is due; one that finds max_open reached is skipped, never
    // sent late (a late start would hide the queueing it is meant to measure).
    while (next < total && start + static_cast<std::int64_t>(next) * interval_ns <= t) {
      Request& r = reqs[next];
      r.due = start + static_cast<std::int64_t>(next) * interval_ns;
      r.burn = coin(rng) < o.burn_percent;
      if (open >= o.max_open) {
        ++res.skipped;
        ++next;
        continue;
      }
      r.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (r.fd < 0) {
        ++res.errors;
        ++next;
        continue;
      }
      const int one = 1;
      ::setsockopt(r.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ++open;
      if (::connect(r.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 &&
          errno != EINPROGRESS) {
        finish(next, false, t);
        ++next;
        continue;
      }
      epoll_event ev{};
      ev.events = EPOLLOUT | EPOLLIN;
      ev.data.u64 = next;
      ::epoll_ctl(ep, EPOLL_CTL_ADD, r.fd, &ev);
      ++next;
    }
    // Nanosecond timeout (epoll_pwait2): due times are often less than a millisecond apart,
    // and rounding to milliseconds would either send late or spin on the CPU the servers need.
    std::int64_t wait_ns = 100'000'000;
    if (next < total) {
      const std::int64_t due = start + static_cast<std::int64_t>(next) * interval_ns;
      wait_ns = std::clamp<std::int64_t>(due - now_ns(), 0, wait_ns);
    }
    const timespec wait_ts{static_cast<time_t>(wait_ns / 1'000'000'000), static_cast<long>(wait_ns % 1'000'000'000)};
    const int n = ::epoll_pwait2(ep, events.data(), static_cast<int>(events.size()), &wait_ts, nullptr);
    t = now_ns();
    for (int k = 0; k < n; ++k) {
      const std::uint64_t i = events[static_cast<std::size_t>(k)].data.u64;
      Request& r = reqs[i];
      if (r.fd < 0) continue;
      const std::uint32_t e = events[static_cast<std::size_t>(k)].events;
      if (!r.sent && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        const std::string& req = r.burn ? burn_req : short_req;
        if (::send(r.fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
          finish(i, false, t);
          continue;
        }
        r.sent = true;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = i;
        ::epoll_ctl(ep, EPOLL_CTL_MOD, r.fd, &ev);
        continue;
      }
      if (!(e & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
      char buf[4096];
      for (;;) {
        const ssize_t got = ::recv(r.fd, buf, sizeof buf, MSG_DONTWAIT);
        if (got > 0) {
          const std::size_t room = r.received < sizeof r.head ? sizeof r.head - r.received : 0;
          const std::size_t take = std::min(room, static_cast<std::size_t>(got));
          std::memcpy(r.head + r.received, buf, take);
          r.received += static_cast<std::size_t>(got);
          continue;
        }
        if (got == 0) {  // the server closed: the answer is complete
          r.ok = r.received >= sizeof r.head && std::memcmp(r.head, "HTTP/1.1 200", 12) == 0;
          finish(i, r.received > 0, t);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
          finish(i, false, t);
        }
        break;
      }
    }
  }
  for (auto& r : reqs) {
    if (r.fd >= 0) {
      ::close(r.fd);
      ++res.timeouts;
    }
  }
  const double elapsed = static_cast<double>(now_ns() - start) / 1e9;
  const std::size_t done = res.short_ns.size() + res.burn_ns.size();
  std::printf("rate=%.0f duration=%.1f sent=%llu completed=%zu errors=%zu skipped=%zu timeouts=%zu "
              "non_200=%zu elapsed_s=%.2f\n",
              o.rate, o.duration, static_cast<unsigned long long>(next - res.skipped), done,
              res.errors, res.skipped, res.timeouts, res.non_200, elapsed);
  std::vector<std::int64_t> all = res.short_ns;
  all.insert(all.end(), res.burn_ns.begin(), res.burn_ns.end());
  line("all", all);
  line("short", res.short_ns);
  line("burn", res.burn_ns);
  if (!o.cpu_pids.empty() && done > 0) {
    const double tick_us = 1e6 / static_cast<double>(::sysconf(_SC_CLK_TCK));
    std::printf("cpu_us_per_request");
    for (std::size_t k = 0; k < o.cpu_pids.size(); ++k) {
      const long after = cpu_ticks(o.cpu_pids[k]);
      if (after < 0 || cpu_before[k] < 0) {
        std::printf(" %d=gone", o.cpu_pids[k]);
        continue;
      }
      std::printf(" %d=%.2f", o.cpu_pids[k],
                  static_cast<double>(after - cpu_before[k]) * tick_us / static_cast<double>(done));
    }
    std::printf("\n");
  }
  ::close(ep);
  return res.errors + res.timeouts > 0 ? 1 : 0;
}
