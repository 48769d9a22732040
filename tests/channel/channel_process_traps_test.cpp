// Kernel traps that need a second process: a receiver at RLIMIT_NOFILE (R9), a non-root
// sender against the in-flight limit (R10), a receiver that dies with descriptors in
// flight (R12, R13) and an exec after receiving (R7). The helpers are this test binary
// re-executed; they report over the readiness pipe, so nothing here sleeps.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "sockshare/channel.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using std::chrono::seconds;
using test::Child;
using test::FdLeakTest;

std::span<const std::byte> bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

std::string fd_target(int fd) {
  char target[256] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  return n > 0 ? std::string(target, static_cast<std::size_t>(n)) : "?";
}

// The end of a fresh channel pair that goes to a child; the parent keeps the other.
struct ChannelToChild {
  Channel mine;
  Fd theirs;
};
ChannelToChild channel_to_child() {
  auto [a, b] = Channel::pair();
  return {std::move(a), b.release()};
}

// Waits until `fd` is readable and reads what is there (at most 256 bytes): "" at EOF,
// "<reset>" when the connection was reset.
std::string read_some(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 5000) != 1) return "<timeout>";
  char buffer[256];
  const ssize_t n = ::read(fd, buffer, sizeof buffer);
  if (n < 0) return errno == ECONNRESET ? "<reset>" : "<error " + errno_name(errno) + ">";
  return std::string(buffer, static_cast<std::size_t>(n));
}

Child spawn(const std::string& helper, std::vector<BorrowedFd> inherit = {},
            bool close_other_fds = true) {
  test::SpawnOptions options;
  options.inherit = std::move(inherit);
  options.close_other_fds = close_other_fds;
  return Child::helper(helper, std::move(options));
}

class ChannelProcessTraps : public FdLeakTest {};

// ---- R7: exec after receiving ----

// Lists its descriptors above stderr as "fd=target" words.
SOCKSHARE_HELPER(chan_list_fds) {
  std::string line;
  for (int fd : test::open_fds()) {
    if (fd > 2) line += std::to_string(fd) + "=" + fd_target(fd) + " ";
  }
  ctx.ready(line);
  return 0;
}

TEST_F(ChannelProcessTraps, R7_ExecutedProgramInheritsNoReceivedDescriptor) {
  // Inheritable descriptors this process had before the test (from whoever started it).
  std::set<std::string> inherited_before;
  for (int fd : test::open_fds()) {
    if (fd > 2 && (::fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0) inherited_before.insert(fd_target(fd));
  }
  // Positive control: an inheritable pipe kept open must show up in the child, or the
  // probe is blind.
  auto [control_r, control_w] = test::make_pipe(/*cloexec=*/false);

  auto [a, b] = Channel::pair();
  std::vector<std::string> received_targets;
  std::vector<Fd> received;
  {
    auto [pr, pw] = test::make_pipe(/*cloexec=*/false);
    Fd udp(::socket(AF_INET, SOCK_DGRAM, 0));
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    Fd ux(sv[0]);
    Fd uy(sv[1]);
    BorrowedFd fds[] = {pr.borrow(), pw.borrow(), udp.borrow(), ux.borrow()};
    a.send({.fds = fds}, seconds(5));
    // The senders' inheritable originals close here; only the received copies remain.
  }
  Message m = b.receive({.allow_unix_sockets = true}, seconds(5));
  ASSERT_EQ(m.fds.size(), 4u);
  for (auto& fd : m.fds) received_targets.push_back(fd_target(fd.get()));

  Child child = spawn("chan_list_fds", {}, /*close_other_fds=*/false);
  const std::string line = child.wait_ready();
  EXPECT_EQ(child.wait_exit(), 0);

  std::map<int, std::string> in_child;
  std::istringstream words(line);
  for (std::string word; words >> word;) {
    const auto eq = word.find('=');
    ASSERT_NE(eq, std::string::npos) << line;
    in_child[std::stoi(word.substr(0, eq))] = word.substr(eq + 1);
  }
  std::set<std::string> child_targets;
  for (const auto& [fd, target] : in_child) {
    if (fd != 3) child_targets.insert(target);  // fd 3 is the helper's readiness pipe
  }
  EXPECT_EQ(child_targets.count(fd_target(control_w.get())), 1u)
      << "the inheritable control pipe did not reach the child: " << line;
  for (const auto& target : received_targets) {
    EXPECT_EQ(child_targets.count(target), 0u) << target << " leaked into the child: " << line;
  }
  for (const auto& target : child_targets) {
    if (target.starts_with("socket:")) {
      EXPECT_EQ(inherited_before.count(target), 1u) << "the child inherited " << target;
    }
  }
}

// ---- R9: receiver at RLIMIT_NOFILE ----

// Lowers RLIMIT_NOFILE to leave 4 free slots, then receives one message and reports how
// it failed and whether anything stayed open; then proves the channel still works.
SOCKSHARE_HELPER(chan_rlimit_receiver) {
  Channel channel(ctx.take_fd(0));
  const std::set<int> before = test::open_fds();
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = static_cast<rlim_t>(*before.rbegin() + 1 + 4);
  if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return 2;
  ctx.ready("armed");
  std::string result;
  try {
    Message m = channel.receive({}, seconds(10));
    result = "accepted " + std::to_string(m.fds.size());
  } catch (const ChannelError& e) {
    result = std::string(to_string(e.kind())) + " errno=" + errno_name(e.code()) +
             " seq=" + std::to_string(e.message_seq()) + " what=" + e.what();
  }
  result += test::open_fds() == before ? " leaked=0" : " leaked=yes";
  ctx.ready(result);
  Message next = channel.receive({}, seconds(10));
  ctx.ready("second " + std::string(next.payload_text()));
  return 0;
}

TEST_F(ChannelProcessTraps, R9_ReceiverAtRlimitReportsOverloadedAndLosesNothingSilently) {
  auto [channel, theirs] = channel_to_child();
  Child child = spawn("chan_rlimit_receiver", {theirs.borrow()});
  theirs.reset();
  ASSERT_EQ(child.wait_ready(), "armed");

  std::vector<Fd> read_ends;
  std::vector<Fd> write_ends;
  std::vector<BorrowedFd> fds;
  for (int i = 0; i < 20; ++i) {
    auto [r, w] = test::make_pipe();
    fds.push_back(w.borrow());
    read_ends.push_back(std::move(r));
    write_ends.push_back(std::move(w));
  }
  // The sender sees success although the receiver can take only 4: this is why a
  // handoff counts as done only after the receiver acknowledges it.
  const std::uint64_t seq = channel.send({.fds = fds}, seconds(5));
  write_ends.clear();

  const std::string report = child.wait_ready();
  EXPECT_TRUE(report.starts_with("overloaded errno=EMFILE seq=" + std::to_string(seq) + " "))
      << report;
  EXPECT_TRUE(contains(report, " of 20 arrived")) << report;
  EXPECT_TRUE(report.ends_with(" leaked=0")) << report;
  // The kernel closed the 16 it could not install, the channel the 4 it did: every
  // write end is gone, so every read end is at EOF.
  for (std::size_t i = 0; i < read_ends.size(); ++i) {
    EXPECT_EQ(read_some(read_ends[i].get()), "") << "read end " << i;
  }
  channel.send({.payload = bytes("ping")}, seconds(5));
  EXPECT_EQ(child.wait_ready(), "second ping");
  EXPECT_EQ(child.wait_exit(), 0);
}

// ---- R10: the in-flight limit of a non-root sender ----

// Drops to nobody with RLIMIT_NOFILE 32 and sends one descriptor per message to a peer
// that does not read, until the kernel says stop; then reads one and sends again.
SOCKSHARE_HELPER(chan_inflight_nonroot) {
  rlimit limit{32, 32};
  if (::setrlimit(RLIMIT_NOFILE, &limit) != 0 || ::setgroups(0, nullptr) != 0 ||
      ::setgid(65534) != 0 || ::setuid(65534) != 0) {
    ctx.ready("skip " + errno_name(errno));
    return 0;
  }
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  int sent = 0;
  std::string outcome = "unbounded";
  for (int i = 0; i < 10000; ++i) {
    try {
      if (a.try_send({.fds = fds})) {
        ++sent;
        continue;
      }
      outcome = "wouldblock";
    } catch (const Error& e) {
      outcome = std::string(to_string(e.kind())) + " " + errno_name(e.code());
    }
    break;
  }
  std::string after = "stuck";
  try {
    (void)b.receive({}, seconds(5));
    if (a.try_send({.fds = fds})) after = "recovered";
  } catch (const Error& e) {
    after = e.what();
  }
  ctx.ready(outcome + " sent=" + std::to_string(sent) + " " + after);
  return 0;
}

TEST_F(ChannelProcessTraps, R10_NonRootSenderHitsTheInFlightLimitAsOverloaded) {
  Child child = spawn("chan_inflight_nonroot");
  const std::string report = child.wait_ready();
  EXPECT_EQ(child.wait_exit(), 0);
  if (report.starts_with("skip")) GTEST_SKIP() << "cannot drop to uid 65534: " << report;
  EXPECT_TRUE(report.starts_with("overloaded ETOOMANYREFS sent=")) << report;
  std::istringstream words(report.substr(report.find("sent=") + 5));
  int sent = 0;
  words >> sent;
  // The kernel allows RLIMIT_NOFILE descriptors in flight per user, then refuses.
  EXPECT_GE(sent, 1) << report;
  EXPECT_LE(sent, 33) << report;
  EXPECT_TRUE(report.ends_with(" recovered")) << report;
}

// ---- R12 / R13: the receiver dies with descriptors in flight ----

SOCKSHARE_HELPER(chan_never_reads) {
  Fd channel = ctx.take_fd(0);
  ctx.ready("idle");
  ::poll(nullptr, 0, 30000);  // the test kills us long before
  return 3;
}

// Receives one TCP connection, answers on it, and acknowledges the handoff.
SOCKSHARE_HELPER(chan_serve_one) {
  Channel channel(ctx.take_fd(0));
  ctx.ready("waiting");
  Message m = channel.receive({.expect = Expect::tcp_stream}, seconds(10));
  if (m.fds.size() != 1 || ::write(m.fds[0].get(), "served", 6) != 6) return 2;
  const std::string ack = std::to_string(m.seq);
  channel.send({.type = 2, .payload = bytes(ack)}, seconds(5));
  return 0;
}

TEST_F(ChannelProcessTraps, R12_ReceiverDiesWithDescriptorsInFlight) {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  const Endpoint where = local_endpoint(listener.borrow());
  auto accept_one = [&] {
    pollfd p{listener.get(), POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 5000), 1);
    return Fd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  };
  Fd client_kept = connect_to(where);
  Fd server_kept = accept_one();
  Fd client_lost = connect_to(where);
  Fd server_lost = accept_one();
  ASSERT_TRUE(server_kept.valid());
  ASSERT_TRUE(server_lost.valid());

  auto [channel, theirs] = channel_to_child();
  Child doomed = spawn("chan_never_reads", {theirs.borrow()});
  theirs.reset();
  ASSERT_EQ(doomed.wait_ready(), "idle");
  BorrowedFd kept[] = {server_kept.borrow()};
  BorrowedFd lost[] = {server_lost.borrow()};
  channel.send({.type = 1, .fds = kept}, seconds(5));
  channel.send({.type = 1, .fds = lost}, seconds(5));
  server_lost.reset();  // a dispatcher that forgets its copy before the ack
  doomed.kill(SIGKILL);
  EXPECT_EQ(doomed.wait_exit(), 128 + SIGKILL);

  // The kernel freed the in-flight copy with the dead receiver: that client is cut off.
  const std::string lost_sees = read_some(client_lost.get());
  EXPECT_TRUE(lost_sees.empty() || lost_sees == "<reset>") << lost_sees;

  // R13: the dead peer is an error on the next send, not SIGPIPE.
  try {
    channel.send({.payload = bytes("anyone?")}, seconds(5));
    ADD_FAILURE() << "send to a dead receiver succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::peer_gone) << e.what();
  }

  // The copy we kept is intact: dispatch it again, to a receiver that acknowledges.
  auto [channel2, theirs2] = channel_to_child();
  Child worker = spawn("chan_serve_one", {theirs2.borrow()});
  theirs2.reset();
  ASSERT_EQ(worker.wait_ready(), "waiting");
  const std::uint64_t seq = channel2.send({.type = 1, .fds = kept}, seconds(5));
  Message ack = channel2.receive({}, seconds(10));
  EXPECT_EQ(ack.type, 2);
  EXPECT_EQ(ack.payload_text(), std::to_string(seq));
  server_kept.reset();  // only now is the handoff done
  EXPECT_EQ(read_some(client_kept.get()), "served");
  EXPECT_EQ(worker.wait_exit(), 0);
}

}  // namespace
}  // namespace sockshare
