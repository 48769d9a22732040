// Descriptors per second between two processes through sockshare::Channel, against a raw
// sendmsg/recvmsg SCM_RIGHTS loop measured in the same run, and the one-descriptor round trip.
//
//   channel_bench [--reps N] [--quick] [--no-pin]
//   channel_bench --profile raw|channel|nocheck|rawtcp|tcp BATCH [--descriptors TOTAL]
//
// The second form runs one variant alone, for perf, strace or callgrind.
//
// The parent sends, a forked child receives and closes every descriptor it gets. Raw and
// channel runs alternate inside every repetition (the order rotates from one repetition to
// the next) so that drift of a shared machine hits both alike; rates are medians over the
// repetitions and each ratio is the median of the per-repetition ratios. docs/BENCHMARKS.md
// records the results and how to read them.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "linux/sys.hpp"
#include "sockshare/channel.hpp"

namespace {

using namespace sockshare;
using Clock = std::chrono::steady_clock;

constexpr std::array<std::size_t, 4> kBatches = {1, 8, 64, 253};
// Messages per timed run for each batch size: about 0.1-0.2 s per run on a 2-core machine,
// long enough to dwarf the start-up handshake, short enough for several repetitions.
constexpr std::array<std::uint32_t, 4> kMessages = {60000, 16000, 3000, 900};
constexpr std::uint32_t kRoundTrips = 4000;  // per variant and repetition
constexpr auto kStepTimeout = std::chrono::seconds(30);
constexpr unsigned kWholeRunAlarm = 120;  // seconds; a wedged peer must not hang a CI box
// On a loaded machine fewer repetitions are run rather than exceeding the minute.
constexpr auto kTimeBudget = std::chrono::seconds(40);

enum class Op : std::uint32_t { raw_stream, channel_stream, raw_rtt, channel_rtt, quit };

// What the channel receiver accepts, i.e. which per-descriptor check it pays for.
enum class Check : std::uint32_t {
  refuse_unix,  // ReceiveOptions{}: Expect::anything, unix sockets refused (R11)
  none,         // Expect::anything + allow_unix_sockets: no per-descriptor check
  tcp_stream,   // Expect::tcp_stream (R15), what a server receiving connections uses
};

ReceiveOptions options_for(Check check) {
  ReceiveOptions options;
  options.expect = check == Check::tcp_stream ? Expect::tcp_stream : Expect::anything;
  options.allow_unix_sockets = check == Check::none;
  return options;
}

// What travels: pipe ends, or TCP sockets (unconnected, which Expect::tcp_stream accepts as
// it does not listen) for the tcp_stream check.
enum class Pool : std::uint32_t { pipes, tcp };

struct Command {
  Op op = Op::quit;
  Check check = Check::refuse_unix;
  std::uint32_t batch = 0;
  std::uint32_t count = 0;
};

// CPU time this process has used, in nanoseconds. Unlike elapsed time it barely moves when
// other programs load the machine, so it tells where the cost is even on a busy box.
double cpu_ns() {
  timespec t{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
}

// What the receiver reports after each run.
struct Result {
  std::uint64_t received = 0;
  double cpu_ns = 0;
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "channel_bench: %s\n", what.c_str());
  std::_Exit(2);
}

// Sender and receiver each get a CPU of their own, so every figure is cross-core. Unpinned,
// the scheduler sometimes puts both on one core (a ping-pong then takes ~8 us instead of
// ~50 us) and raw and channel runs would not compare like with like.
bool pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(0, sizeof set, &set) == 0;
}

void write_all(int fd, const void* data, std::size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = sys::retry_eintr([&] { return ::write(fd, p, size); });
    if (n <= 0) die("write to control pipe: " + std::string(std::strerror(errno)));
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

// False at end of file (the other process is gone).
bool read_all(int fd, void* data, std::size_t size) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = sys::retry_eintr([&] { return ::read(fd, p, size); });
    if (n == 0) return false;
    if (n < 0) die("read from control pipe: " + std::string(std::strerror(errno)));
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// ---- the raw baseline: what a hand-written SCM_RIGHTS loop costs ----------------------

struct RawSender {
  void send(int socket, const std::vector<int>& pool, std::size_t batch) {
    msghdr msg{};
    char byte = 'x';
    iovec iov{&byte, 1};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control_.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * batch);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * batch);
    std::memcpy(CMSG_DATA(cmsg), pool.data(), sizeof(int) * batch);
    if (sys::retry_eintr([&] { return ::sendmsg(socket, &msg, MSG_NOSIGNAL); }) != 1) {
      die("raw sendmsg: " + std::string(std::strerror(errno)));
    }
  }

  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * wire::kMaxFds)> control_{};
};

// Receives one message and closes every descriptor in it; returns how many there were.
std::size_t raw_receive_and_close(int socket) {
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * wire::kMaxFds)> control;
  char data[64];
  iovec iov{data, sizeof data};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  const ssize_t n = sys::retry_eintr([&] { return ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC); });
  if (n <= 0) die("raw recvmsg: " + std::string(n == 0 ? "end of stream" : std::strerror(errno)));
  if (msg.msg_flags & MSG_CTRUNC) die("raw recvmsg: descriptors lost (MSG_CTRUNC)");
  std::size_t count = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* fds = reinterpret_cast<const unsigned char*>(CMSG_DATA(c));
    for (std::size_t i = 0; i < k; ++i) {
      int fd = -1;
      std::memcpy(&fd, fds + i * sizeof(int), sizeof(int));
      ::close(fd);
    }
    count += k;
  }
  return count;
}

// ---- the receiving process ---------------------------------------------------------

int receiver_main(int raw_socket, Channel channel, int command_fd, int result_fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  Message message;  // reused: its vectors keep their capacity from one receive to the next
  char ack = 'k';
  const std::array<std::byte, 2> ack_payload = {std::byte{'o'}, std::byte{'k'}};
  Command cmd;
  try {
    while (read_all(command_fd, &cmd, sizeof cmd) && cmd.op != Op::quit) {
      const ReceiveOptions options = options_for(cmd.check);
      Result result;
      const double cpu_start = cpu_ns();
      for (std::uint32_t i = 0; i < cmd.count; ++i) {
        std::size_t got = 0;
        switch (cmd.op) {
          case Op::raw_stream:
            got = raw_receive_and_close(raw_socket);
            break;
          case Op::raw_rtt:
            got = raw_receive_and_close(raw_socket);
            if (sys::retry_eintr([&] { return ::send(raw_socket, &ack, 1, MSG_NOSIGNAL); }) != 1) {
              die("raw ack send: " + std::string(std::strerror(errno)));
            }
            break;
          case Op::channel_stream:
            channel.receive(message, options, kStepTimeout);
            got = message.fds.size();
            break;
          case Op::channel_rtt:
            channel.receive(message, options, kStepTimeout);
            got = message.fds.size();
            message.fds.clear();  // close before acknowledging, as the raw loop does
            channel.send(Outgoing{.type = 2, .payload = ack_payload}, kStepTimeout);
            break;
          case Op::quit:
            break;
        }
        if (got != cmd.batch) {
          die("receiver expected " + std::to_string(cmd.batch) + " descriptors, got " +
              std::to_string(got));
        }
        result.received += got;
      }
      message.fds.clear();  // the last batch: closed by dropping the owners
      result.cpu_ns = cpu_ns() - cpu_start;
      write_all(result_fd, &result, sizeof result);
    }
  } catch (const std::exception& e) {
    die(std::string("receiver: ") + e.what());
  }
  return 0;
}

// ---- the sending process -----------------------------------------------------------

class Bench {
 public:
  Bench(int raw_socket, Channel channel, int command_fd, int result_fd, pid_t child,
        std::vector<int> pipes, std::vector<int> tcp)
      : raw_(raw_socket),
        channel_(std::move(channel)),
        command_fd_(command_fd),
        result_fd_(result_fd),
        child_(child) {
    pools_[0] = std::move(pipes);
    pools_[1] = std::move(tcp);
    for (std::size_t i = 0; i < pools_.size(); ++i) {
      for (int fd : pools_[i]) borrowed_[i].emplace_back(fd);
    }
  }

  struct Sample {
    double rate = 0;             // descriptors per second
    double send_cpu_per_fd = 0;  // ns
    double receive_cpu_per_fd = 0;
  };

  // One timed run.
  Sample stream(Op op, Check check, Pool pool, std::size_t batch, std::uint32_t messages) {
    start(Command{op, check, static_cast<std::uint32_t>(batch), messages});
    const auto& fds = pools_[static_cast<std::size_t>(pool)];
    const auto& borrowed = borrowed_[static_cast<std::size_t>(pool)];
    const Outgoing out{.type = 1, .fds = std::span<const BorrowedFd>(borrowed.data(), batch)};
    const auto t0 = Clock::now();
    const double cpu0 = cpu_ns();
    for (std::uint32_t i = 0; i < messages; ++i) {
      if (op == Op::raw_stream)
        raw_sender_.send(raw_, fds, batch);
      else
        channel_.send(out, kStepTimeout);
    }
    const double send_cpu = cpu_ns() - cpu0;
    const Result result = finish(std::uint64_t{messages} * batch);
    const std::chrono::duration<double> elapsed = Clock::now() - t0;
    const double total = static_cast<double>(messages) * static_cast<double>(batch);
    return {total / elapsed.count(), send_cpu / total, result.cpu_ns / total};
  }

  // One-descriptor round trips, appended to `samples` in microseconds.
  void round_trips(Op op, std::uint32_t count, std::vector<double>& samples) {
    start(Command{op, Check::refuse_unix, 1, count});
    const Outgoing out{.type = 1, .fds = std::span<const BorrowedFd>(borrowed_[0].data(), 1)};
    char ack = 0;
    for (std::uint32_t i = 0; i < count; ++i) {
      const auto t0 = Clock::now();
      if (op == Op::raw_rtt) {
        raw_sender_.send(raw_, pools_[0], 1);
        if (sys::retry_eintr([&] { return ::recv(raw_, &ack, 1, 0); }) != 1) {
          die("raw ack recv: " + std::string(std::strerror(errno)));
        }
      } else {
        channel_.send(out, kStepTimeout);
        channel_.receive(ack_, ReceiveOptions{}, kStepTimeout);
      }
      const std::chrono::duration<double, std::micro> elapsed = Clock::now() - t0;
      samples.push_back(elapsed.count());
    }
    finish(count);
  }

  // Stops the receiver and reaps it; a receiver that does not stop in time is killed.
  void stop() {
    if (child_ <= 0) return;
    Command quit;
    write_all(command_fd_, &quit, sizeof quit);
    for (int i = 0; i < 500; ++i) {
      int status = 0;
      if (::waitpid(child_, &status, WNOHANG) == child_) {
        child_ = -1;
        return;
      }
      ::usleep(10000);
    }
    ::kill(child_, SIGKILL);
    ::waitpid(child_, nullptr, 0);
    child_ = -1;
  }

  ~Bench() {
    if (child_ > 0) {
      ::kill(child_, SIGKILL);
      ::waitpid(child_, nullptr, 0);
    }
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

 private:
  void start(const Command& cmd) { write_all(command_fd_, &cmd, sizeof cmd); }

  Result finish(std::uint64_t expected) {
    Result result;
    if (!read_all(result_fd_, &result, sizeof result)) die("receiver exited early");
    if (result.received != expected) {
      die("receiver counted " + std::to_string(result.received) + ", expected " +
          std::to_string(expected));
    }
    return result;
  }

  int raw_;
  Channel channel_;
  int command_fd_;
  int result_fd_;
  pid_t child_;
  std::array<std::vector<int>, 2> pools_;
  std::array<std::vector<BorrowedFd>, 2> borrowed_;
  RawSender raw_sender_;
  Message ack_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const auto index = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(index, v.size() - 1)];
}

std::string with_commas(double value) {
  auto n = static_cast<unsigned long long>(value + 0.5);
  std::string digits = std::to_string(n);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

struct ProfileRequest {
  std::string_view variant;  // empty: the full benchmark
  std::size_t batch = 1;
  std::size_t descriptors = 2'000'000;  // in total
};

// Runs one variant alone for a few seconds, for perf/strace: `--profile channel 1`.
int profile(Bench& bench, const ProfileRequest& request) {
  const std::string_view variant = request.variant;
  const std::size_t batch = request.batch;
  const Op op = variant.starts_with("raw") ? Op::raw_stream : Op::channel_stream;
  const Check check = variant == "nocheck" ? Check::none
                      : variant == "tcp"   ? Check::tcp_stream
                                           : Check::refuse_unix;
  const Pool pool = variant == "tcp" || variant == "rawtcp" ? Pool::tcp : Pool::pipes;
  const auto messages = static_cast<std::uint32_t>(request.descriptors / batch);
  const auto sample = bench.stream(op, check, pool, batch, messages);
  std::printf("%s batch %zu: %s fds/s, CPU per descriptor: sender %.0f ns, receiver %.0f ns\n",
              std::string(variant).c_str(), batch, with_commas(sample.rate).c_str(),
              sample.send_cpu_per_fd, sample.receive_cpu_per_fd);
  bench.stop();
  return 0;
}

int run(int reps, bool quick, bool pin, const ProfileRequest& request) {
  // In-flight descriptors are charged to the sender's RLIMIT_NOFILE (ETOOMANYREFS beyond it
  // without CAP_SYS_RESOURCE); a full socket buffer of 253-descriptor messages exceeds 1024.
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &limit);
  }

  // The descriptors that travel. 127 pipes give 254 ends; 253 TCP sockets.
  std::vector<Fd> owners;
  std::vector<int> pipes;
  std::vector<int> tcp;
  while (pipes.size() < wire::kMaxFds) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) die("pipe2: " + std::string(std::strerror(errno)));
    owners.emplace_back(p[0]);
    owners.emplace_back(p[1]);
    pipes.push_back(p[0]);
    if (pipes.size() < wire::kMaxFds) pipes.push_back(p[1]);
  }
  while (tcp.size() < wire::kMaxFds) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: " + std::string(std::strerror(errno)));
    owners.emplace_back(fd);
    tcp.push_back(fd);
  }

  // The raw baseline gets the same socket type as the channel, in blocking mode as a
  // hand-written loop would use it.
  int raw_pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, raw_pair) != 0) {
    die("socketpair: " + std::string(std::strerror(errno)));
  }
  Fd raw_parent(raw_pair[0]);
  Fd raw_child(raw_pair[1]);
  auto [channel_parent, channel_child] = Channel::pair();
  int command_pipe[2];
  int result_pipe[2];
  if (::pipe2(command_pipe, O_CLOEXEC) != 0 || ::pipe2(result_pipe, O_CLOEXEC) != 0) {
    die("pipe2: " + std::string(std::strerror(errno)));
  }
  Fd command_read(command_pipe[0]);
  Fd command_write(command_pipe[1]);
  Fd result_read(result_pipe[0]);
  Fd result_write(result_pipe[1]);

  const bool pinned = pin && ::sysconf(_SC_NPROCESSORS_ONLN) >= 2 && pin_to_cpu(0);
  std::fflush(stdout);
  const pid_t child = ::fork();
  if (child < 0) die("fork: " + std::string(std::strerror(errno)));
  if (child == 0) {
    if (pinned) pin_to_cpu(1);
    raw_parent.reset();
    command_write.reset();
    result_read.reset();
    owners.clear();                    // the receiver holds only what it receives
    channel_parent.release().reset();  // the sender's end has no business in the receiver
    std::_Exit(receiver_main(raw_child.get(), std::move(channel_child), command_read.get(),
                             result_write.get()));
  }
  raw_child.reset();
  command_read.reset();
  result_write.reset();
  channel_child.release().reset();  // only the receiver holds its end, so EOF reaches it
  Bench bench(raw_parent.get(), std::move(channel_parent), command_write.get(), result_read.get(),
              child, pipes, tcp);

  if (!request.variant.empty()) return profile(bench, request);

  struct Variant {
    Op op;
    Check check;
    Pool pool;
  };
  enum : std::size_t { kRaw, kChannel, kNoCheck, kRawTcp, kTcpStream, kVariants };
  const std::array<Variant, kVariants> variants = {{
      {Op::raw_stream, Check::none, Pool::pipes},
      {Op::channel_stream, Check::refuse_unix, Pool::pipes},
      {Op::channel_stream, Check::none, Pool::pipes},
      {Op::raw_stream, Check::none, Pool::tcp},
      {Op::channel_stream, Check::tcp_stream, Pool::tcp},
  }};
  const double scale = quick ? 0.2 : 1.0;

  // Warm-up: page in code, grow buffers, let the scheduler settle both processes.
  for (const auto& v : variants) bench.stream(v.op, v.check, v.pool, 8, 2000);

  // rates[batch][variant][rep], and the CPU each side spent per descriptor
  using Table = std::vector<std::vector<std::vector<double>>>;
  Table rates(kBatches.size(), std::vector<std::vector<double>>(variants.size()));
  Table send_cpu = rates;
  Table receive_cpu = rates;
  std::vector<double> rtt_raw, rtt_channel;
  const auto rtts = static_cast<std::uint32_t>(kRoundTrips * scale);
  const auto started = Clock::now();
  int done = 0;
  for (int rep = 0; rep < reps; ++rep, ++done) {
    if (rep >= 3 && Clock::now() - started > kTimeBudget) break;
    for (std::size_t b = 0; b < kBatches.size(); ++b) {
      const auto messages = static_cast<std::uint32_t>(kMessages[b] * scale);
      for (std::size_t k = 0; k < variants.size(); ++k) {
        const std::size_t v = (k + static_cast<std::size_t>(rep)) % variants.size();
        const auto sample = bench.stream(variants[v].op, variants[v].check, variants[v].pool,
                                         kBatches[b], messages);
        rates[b][v].push_back(sample.rate);
        send_cpu[b][v].push_back(sample.send_cpu_per_fd);
        receive_cpu[b][v].push_back(sample.receive_cpu_per_fd);
      }
    }
    if (rep % 2 == 0) {
      bench.round_trips(Op::raw_rtt, rtts, rtt_raw);
      bench.round_trips(Op::channel_rtt, rtts, rtt_channel);
    } else {
      bench.round_trips(Op::channel_rtt, rtts, rtt_channel);
      bench.round_trips(Op::raw_rtt, rtts, rtt_raw);
    }
  }
  const std::chrono::duration<double> took = Clock::now() - started;
  bench.stop();

  // The median of per-repetition ratios: each pair ran back to back, under the same load.
  auto ratio = [&](std::size_t b, std::size_t variant, std::size_t baseline) {
    std::vector<double> r;
    for (std::size_t rep = 0; rep < rates[b][variant].size(); ++rep) {
      r.push_back(rates[b][variant][rep] / rates[b][baseline][rep]);
    }
    return median(r);
  };

  std::printf(
      "sockshare channel benchmark: sender and receiver in 2 processes (fork), "
      "AF_UNIX SOCK_SEQPACKET\n");
  std::printf(
      "%d repetitions in %.1f s; rates are medians, ratios the median of "
      "per-repetition ratios\n",
      done, took.count());
#ifndef __OPTIMIZE__
  std::printf(
      "WARNING: built without optimization; configure with "
      "-DCMAKE_BUILD_TYPE=Release for meaningful numbers\n");
#endif
  std::printf("sender on CPU 0, receiver on CPU 1: %s\n",
              pinned ? "yes" : "no (--no-pin, 1 CPU, or pinning failed)");
  std::printf("every receiver closes each descriptor it receives\n");
  std::printf(
      "  raw      sendmsg(1 byte + SCM_RIGHTS), recvmsg(MSG_CMSG_CLOEXEC) + close, "
      "blocking socket\n");
  std::printf(
      "  channel  Channel::send(Outgoing), Channel::receive(Message&, options) into a "
      "reused Message\n\n");
  std::printf(
      "pipe ends; channel options: ReceiveOptions{} = Expect::anything with unix sockets "
      "refused (R11),\n  nocheck = Expect::anything + allow_unix_sockets "
      "(no per-descriptor check)\n");
  std::printf("%5s %13s %13s %6s %7s %4s %13s %6s %4s\n", "batch", "raw fds/s", "channel fds/s",
              "ratio", "target", "", "nocheck fds/s", "ratio", "");
  bool all_met = true;
  for (std::size_t b = 0; b < kBatches.size(); ++b) {
    const double target = kBatches[b] == 1 ? 0.90 : kBatches[b] >= 64 ? 0.95 : 0.0;
    const double rc = ratio(b, kChannel, kRaw);
    const double rn = ratio(b, kNoCheck, kRaw);
    auto verdict = [&](double r) {
      if (target == 0.0) return "";
      return r >= target ? "ok" : "MISS";
    };
    if (target > 0.0 && rc < target) all_met = false;
    char target_text[16] = "-";
    if (target > 0.0) std::snprintf(target_text, sizeof target_text, ">=%.2f", target);
    std::printf("%5zu %13s %13s %6.3f %7s %4s %13s %6.3f %4s\n", kBatches[b],
                with_commas(median(rates[b][kRaw])).c_str(),
                with_commas(median(rates[b][kChannel])).c_str(), rc, target_text, verdict(rc),
                with_commas(median(rates[b][kNoCheck])).c_str(), rn, verdict(rn));
  }

  std::printf("\nTCP sockets; channel options: Expect::tcp_stream (R15)\n");
  std::printf("%5s %13s %13s %6s\n", "batch", "raw fds/s", "channel fds/s", "ratio");
  for (std::size_t b = 0; b < kBatches.size(); ++b) {
    std::printf("%5zu %13s %13s %6.3f\n", kBatches[b],
                with_commas(median(rates[b][kRawTcp])).c_str(),
                with_commas(median(rates[b][kTcpStream])).c_str(), ratio(b, kTcpStream, kRawTcp));
  }

  std::printf(
      "\nCPU time per descriptor in ns, sender / receiver (medians; robust to other load)\n");
  std::printf("%5s %13s %13s %13s %13s %13s\n", "batch", "raw", "channel", "nocheck", "raw tcp",
              "tcp_stream");
  for (std::size_t b = 0; b < kBatches.size(); ++b) {
    std::printf("%5zu", kBatches[b]);
    for (std::size_t v = 0; v < variants.size(); ++v) {
      char cell[32];
      std::snprintf(cell, sizeof cell, "%.0f / %.0f", median(send_cpu[b][v]),
                    median(receive_cpu[b][v]));
      std::printf(" %13s", cell);
    }
    std::printf("\n");
  }

  const double raw50 = percentile(rtt_raw, 0.50), raw99 = percentile(rtt_raw, 0.99);
  const double ch50 = percentile(rtt_channel, 0.50), ch99 = percentile(rtt_channel, 0.99);
  std::printf(
      "\none-descriptor round trip (a pipe end out; the receiver closes it and acks), "
      "%zu samples each:\n",
      rtt_raw.size());
  std::printf("%8s %9s %9s\n", "", "p50 us", "p99 us");
  std::printf("%8s %9.1f %9.1f\n", "raw", raw50, raw99);
  std::printf("%8s %9.1f %9.1f\n", "channel", ch50, ch99);
  std::printf("%8s %9.3f %9.3f\n", "ratio", ch50 / raw50, ch99 / raw99);
  std::printf("\nthroughput targets (channel with ReceiveOptions{}): %s\n",
              all_met ? "all met" : "NOT all met");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7;
  bool quick = false;
  bool pin = true;
  ProfileRequest request;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (arg == "--profile" && i + 2 < argc) {
      request.variant = argv[++i];
      request.batch = static_cast<std::size_t>(std::atoi(argv[++i]));
      if ((request.variant != "raw" && request.variant != "channel" &&
           request.variant != "nocheck" && request.variant != "rawtcp" &&
           request.variant != "tcp") ||
          request.batch < 1 || request.batch > wire::kMaxFds) {
        std::fprintf(stderr, "channel_bench: --profile raw|channel|nocheck|rawtcp|tcp 1-253\n");
        return 2;
      }
    } else if (arg == "--descriptors" && i + 1 < argc) {
      request.descriptors = static_cast<std::size_t>(std::atol(argv[++i]));
    } else if (arg == "--no-pin") {
      pin = false;
    } else if (arg == "--quick") {
      quick = true;
      reps = 3;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--reps N] [--quick] [--no-pin] [--profile "
                   "raw|channel|nocheck|rawtcp|tcp BATCH "
                   "[--descriptors TOTAL]]\n",
                   argv[0]);
      return 2;
    }
  }
  if (reps < 1 || reps > 50) {
    std::fprintf(stderr, "channel_bench: --reps must be 1-50\n");
    return 2;
  }
  ::alarm(kWholeRunAlarm);
  try {
    return run(reps, quick, pin, request);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "channel_bench: %s\n", e.what());
    return 1;
  }
}
