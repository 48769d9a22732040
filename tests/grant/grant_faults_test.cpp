// Faults of the grant module that only a hostile environment produces: a seccomp profile
// that refuses clone3, an accept that keeps failing, a descriptor table at its limit, an
// info variable naming a standard stream.
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "grant_support.hpp"
#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/spawn.hpp"

namespace sockshare {
namespace {

using namespace grant_test;
using namespace std::chrono_literals;
using test::Child;
using test::FdLeakTest;

class GrantFaults : public FdLeakTest {};

#if defined(__x86_64__)
constexpr std::uint32_t kAuditArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr std::uint32_t kAuditArch = AUDIT_ARCH_AARCH64;
#else
constexpr std::uint32_t kAuditArch = 0;
#endif

// What Docker's default profile does to clone3: ENOSYS, everything else allowed (and, with
// `also_pidfd_open`, pidfd_open refused the same way). A call made under another ABI than
// ours (arch field) is let through untouched.
bool refuse_clone3(bool also_pidfd_open) {
  const std::uint32_t second = also_pidfd_open ? SYS_pidfd_open : SYS_clone3;
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kAuditArch, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 2, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, second, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
  };
  sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
  return ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &program) ==
         0;
}

// args: passing ("argument", "environment", "pipe"), then optionally "full" (a grant table
// of size 0, so granting fails) or "nopidfd" (pidfd_open refused too); fd 3: the socket to
// grant. Installs the filter, proves clone3 is refused, then spawns spawned_redeemer with the
// socket and reports "exit <status>" or "<reaped|child left> err <what>".
SOCKSHARE_HELPER(seccomp_spawner) {
  Fd socket = ctx.take_fd(0);
  const std::string name = ctx.args().at(0);
  if (kAuditArch == 0) {
    ctx.ready("unsupported architecture");
    return 0;
  }
  const std::string variant = ctx.args().size() > 1 ? ctx.args().at(1) : "";
  if (!refuse_clone3(variant == "nopidfd")) {
    ctx.ready("no seccomp filter: " + std::string(std::strerror(errno)));
    return 0;
  }
  // Unfiltered, clone3 with a zero size is EINVAL; the filter answers before the kernel looks.
  if (::syscall(SYS_clone3, nullptr, 0) != -1 || errno != ENOSYS) {
    ctx.ready("filter not effective");
    return 0;
  }
  const InfoPassing passing = name == "argument"      ? InfoPassing::argument
                              : name == "environment" ? InfoPassing::environment
                                                      : InfoPassing::pipe;
  const bool full = variant == "full";
  try {
    GrantServer server({.max_grants = full ? 0U : 1024U});
    SpawnedChild child = spawn_with_socket(
        server, socket.borrow(),
        {.argv = {test::self_exe(), "--sockshare-helper", "spawned_redeemer", name},
         .passing = passing});
    if (child.info.target_pid != child.pid) {
      ctx.ready("granted to pid " + std::to_string(child.info.target_pid));
      return 0;
    }
    siginfo_t status{};
    if (::waitid(P_PID, static_cast<id_t>(child.pid), &status, WEXITED) != 0) {
      ctx.ready("waitid failed");
      return 0;
    }
    ctx.ready("exit " + std::to_string(status.si_code == CLD_EXITED ? status.si_status
                                                                    : 128 + status.si_status));
  } catch (const std::exception& e) {
    // A failed spawn leaves no child behind, not even a zombie.
    const bool reaped = ::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD;
    ctx.ready(std::string(reaped ? "reaped " : "child left ") + "err " + e.what());
  }
  return 0;
}

class GrantSeccomp : public FdLeakTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(GrantSeccomp, S2_SpawnWorksWhereSeccompAnswersClone3WithEnosys) {
  TcpPair tcp = tcp_pair();
  Child spawner = Child::helper("seccomp_spawner", {.args = {GetParam()},
                                                    .inherit = {tcp.server.borrow()}});
  tcp.server.reset();
  const std::string line = spawner.wait_ready();
  if (line == "unsupported architecture" || line.rfind("no seccomp filter", 0) == 0) {
    GTEST_SKIP() << line;
  }
  EXPECT_EQ(line, "exit 0");
  // The grandchild redeemed the socket and answered through it.
  const auto reply = read_within(tcp.client.borrow(), 10s);
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(reply->rfind(GetParam() + " fds=", 0), 0u) << *reply;
  EXPECT_EQ(spawner.wait_exit(), 0);
}

TEST_F(GrantFaults, S2_SpawnWhereSeccompAnswersClone3WithEnosysKillsAndReapsOnAFailedGrant) {
  TcpPair tcp = tcp_pair();
  Child spawner = Child::helper("seccomp_spawner", {.args = {"pipe", "full"},
                                                    .inherit = {tcp.server.borrow()}});
  tcp.server.reset();
  const std::string line = spawner.wait_ready();
  if (line == "unsupported architecture" || line.rfind("no seccomp filter", 0) == 0) {
    GTEST_SKIP() << line;
  }
  EXPECT_EQ(line.rfind("reaped err ", 0), 0u) << line;
  EXPECT_NE(line.find("grant table full"), std::string::npos) << line;
  EXPECT_EQ(spawner.wait_exit(), 0);
}

// Without a pidfd the child cannot be granted, and it may not be killed by pid either (the
// pid is only known to be ours while it waits at the gate): closing the gate must end it.
TEST_F(GrantFaults, S2_SpawnWithoutClone3OrPidfdOpenFailsAndLeavesNoChild) {
  TcpPair tcp = tcp_pair();
  Child spawner = Child::helper("seccomp_spawner", {.args = {"environment", "nopidfd"},
                                                    .inherit = {tcp.server.borrow()}});
  tcp.server.reset();
  const std::string line = spawner.wait_ready();
  if (line == "unsupported architecture" || line.rfind("no seccomp filter", 0) == 0) {
    GTEST_SKIP() << line;
  }
  EXPECT_EQ(line.rfind("reaped err ", 0), 0u) << line;
  EXPECT_NE(line.find("pidfd_open(child"), std::string::npos) << line;
  EXPECT_EQ(spawner.wait_exit(), 0);
}

INSTANTIATE_TEST_SUITE_P(Passing, GrantSeccomp,
                         ::testing::Values("argument", "environment", "pipe"),
                         [](const ::testing::TestParamInfo<std::string>& param) {
                           return param.param;
                         });

// ---- R21: accept keeps failing --------------------------------------------------------------

std::atomic<bool> g_accept_fails{false};
std::atomic<int> g_accept_calls{0};

// EPERM: what accept reports when firewall rules forbid the connection; it stays queued, so
// the listener stays readable for as long as the failure lasts.
int failing_accept4(int fd, sockaddr* address, socklen_t* length, int flags) {
  if (!g_accept_fails.load()) return ::accept4(fd, address, length, flags);
  ++g_accept_calls;
  errno = EPERM;
  return -1;
}

TEST_F(GrantFaults, R21_AcceptThatKeepsFailingNeitherSpinsNorLosesAMoveGrantsEvent) {
  // Declared first so it is restored last, after the serving thread has stopped.
  sys::SeamGuard guard;
  sys::seam().accept4 = failing_accept4;
  g_accept_fails = false;
  g_accept_calls = 0;
  EventLog log;
  GrantServer server({.on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  const std::uint64_t inode = inode_of(tcp.server.borrow());
  const SocketInfo info = server.move(std::move(tcp.server), Target::self(), {.ttl = 300ms});
  g_accept_fails = true;
  // A redeemer whose connection every accept fails on.
  Channel redeemer = Channel::connect(info.grant_endpoint(), 5s);
  const auto request = std::vector<std::byte>(
      reinterpret_cast<const std::byte*>(info.token.data()),
      reinterpret_cast<const std::byte*>(info.token.data()) + info.token.size());
  std::vector<std::byte> payload = request;
  payload.resize(20);
  redeemer.send({.type = grant_protocol::kRedeem, .payload = payload}, 5s);

  // The move grant still expires and hands its socket back through on_event.
  ASSERT_TRUE(log.wait_for(1, 5s)) << "no event after " << g_accept_calls.load() << " accepts";
  auto events = log.take();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].outcome, GrantOutcome::expired);
  ASSERT_TRUE(events[0].returned.valid());
  EXPECT_EQ(inode_of(events[0].returned.borrow()), inode);
  // ~300 ms of a failing accept: a few retries, not a busy loop.
  const int calls = g_accept_calls.load();
  EXPECT_GE(calls, 1);
  EXPECT_LE(calls, 40) << "the listener was polled again without a pause";

  // Once accept works again the waiting connection is served: the grant is gone.
  g_accept_fails = false;
  const Message answer = redeemer.receive({.max_fds = 0}, 5s);
  EXPECT_EQ(answer.type, grant_protocol::kRefused);
  EXPECT_NE(std::string(answer.payload_text()).find("no such grant"), std::string::npos);
}

// ---- R19/R20: revoke at the descriptor limit ----------------------------------------------

// Lowers RLIMIT_NOFILE to just above the descriptors open now and fills what is left, so
// the next descriptor this process asks for fails with EMFILE. Undone when destroyed.
class DescriptorTableFull {
 public:
  DescriptorTableFull() : model_(*test::open_fds().begin()) {
    ::getrlimit(RLIMIT_NOFILE, &saved_);
    rlimit lowered = saved_;
    lowered.rlim_cur = static_cast<rlim_t>(*test::open_fds().rbegin() + 8);
    ::setrlimit(RLIMIT_NOFILE, &lowered);
    // Every free number below the new limit, gaps included: bounded by the limit itself.
    for (rlim_t i = 0; i < lowered.rlim_cur; ++i) {
      Fd filler(::fcntl(model_, F_DUPFD_CLOEXEC, 0));
      if (!filler.valid()) break;
      fillers_.push_back(std::move(filler));
    }
  }
  ~DescriptorTableFull() {
    fillers_.clear();
    ::setrlimit(RLIMIT_NOFILE, &saved_);
  }
  DescriptorTableFull(const DescriptorTableFull&) = delete;
  DescriptorTableFull& operator=(const DescriptorTableFull&) = delete;
  [[nodiscard]] bool full() const {
    Fd probe(::fcntl(model_, F_DUPFD_CLOEXEC, 0));
    return !probe.valid() && errno == EMFILE;
  }
  void free_one() { fillers_.pop_back(); }

 private:
  int model_;  // any open descriptor, to copy
  rlimit saved_{};
  std::vector<Fd> fillers_;
};

// UBSan's vptr check reads type information through a pipe it opens on the spot, so while
// the descriptor table is full it reports (and stops at) every polymorphic object, this
// test's Error included. Present only in sanitizer builds.
extern "C" void __ubsan_handle_dynamic_type_cache_miss(void*, void*, void*)
    __attribute__((weak));

TEST_F(GrantFaults, R19_RevokeOfADirectGrantAtEmfileThrowsAndKeepsTheGrant) {
  if (&__ubsan_handle_dynamic_type_cache_miss != nullptr) {
    GTEST_SKIP() << "UBSan's vptr check needs free descriptors; runs in the plain build";
  }
  GrantServer server({.background_thread = false});
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self(),
                                           {.ttl = std::chrono::seconds(30), .direct = true});
  if ((info.flags & SocketInfo::kFlagDirect) == 0) GTEST_SKIP() << "no SO_COOKIE: no direct grant";
  {
    DescriptorTableFull table;
    ASSERT_TRUE(table.full());
    expect_error([&] { (void)server.revoke(info); }, ErrorKind::overloaded, "the grant stays");
    EXPECT_EQ(server.stats().pending, 1u);
    // The number the info names still holds the socket: nothing was closed.
    EXPECT_EQ(inode_of(BorrowedFd(info.source_fd)), inode_of(tcp.server.borrow()));
    table.free_one();
    std::optional<Fd> back = server.revoke(info);
    ASSERT_TRUE(back.has_value());
    ASSERT_TRUE(back->valid());
    EXPECT_NE(back->get(), info.source_fd);
    EXPECT_EQ(inode_of(back->borrow()), inode_of(tcp.server.borrow()));
  }
  EXPECT_EQ(server.stats().pending, 0u);
}

// ---- R7: inherited_info never takes a standard stream ----------------------------------------

// args: the descriptor number (0-2) to name in T_INFO_FD. Makes stdin an empty pipe at end
// of file, calls inherited_info("T_INFO") and reports
// "fd=<open|closed> cloexec=<0|1> <kind>: <what>" for the named descriptor afterwards.
SOCKSHARE_HELPER(info_from_standard_stream) {
  const int number = std::stoi(ctx.args().at(0));
  auto [read_end, write_end] = test::make_pipe(false);
  write_end.reset();
  if (::dup2(read_end.get(), 0) != 0) return 3;
  read_end.reset();
  ::setenv("T_INFO_FD", ctx.args().at(0).c_str(), 1);
  std::string outcome;
  try {
    (void)inherited_info("T_INFO");
    outcome = "no error";
  } catch (const Error& e) {
    outcome = std::string(to_string(e.kind())) + ": " + e.what();
  }
  const int flags = ::fcntl(number, F_GETFD);
  ctx.ready(std::string(flags < 0 ? "fd=closed" : "fd=open") +
            " cloexec=" + ((flags > 0 && (flags & FD_CLOEXEC) != 0) ? "1 " : "0 ") + outcome);
  return 0;
}

TEST_F(GrantFaults, R7_InheritedInfoRefusesToTakeAStandardStream) {
  const std::string expected =
      "fd=open cloexec=0 " + std::string(to_string(ErrorKind::invalid_input)) + ": ";
  for (const char* number : {"0", "1", "2"}) {
    Child child = Child::helper("info_from_standard_stream", {.args = {number}});
    const std::string line = child.wait_ready();
    EXPECT_EQ(line.rfind(expected, 0), 0u) << number << ": " << line;
    EXPECT_NE(line.find("standard streams"), std::string::npos) << line;
    EXPECT_EQ(child.wait_exit(), 0);
  }
}

}  // namespace
}  // namespace sockshare
