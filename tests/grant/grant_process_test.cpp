// duplicate/redeem across processes: the contract S1-S9 and the grant faults R17-R20.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

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
namespace gp = grant_protocol;

class Grant : public FdLeakTest {};

std::vector<std::byte> redeem_request(const SocketInfo& info, std::uint32_t flags = 0) {
  std::vector<std::byte> out(20);
  std::memcpy(out.data(), info.token.data(), 16);
  for (int i = 0; i < 4; ++i) out[16 + i] = std::byte{static_cast<std::uint8_t>(flags >> (8 * i))};
  return out;
}

// Serves a manual-mode server until `done` holds or 5 s pass.
template <class Done>
void serve_until(GrantServer& server, Done done) {
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    pollfd p{server.native_handle().get(), POLLIN, 0};
    ::poll(&p, 1, 50);
    server.process_events();
  }
}

// ---- S1 / R17: bound to one target ------------------------------------------------------

TEST_F(Grant, S1_GrantBoundToOneTarget_AnotherProcessPresentingItIsRefused) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  Redeemer other = Redeemer::start();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid()));
  other.send(info.format());
  const std::string refused = other.child.wait_ready();
  EXPECT_EQ(refused.rfind("err refused", 0), 0u) << refused;
  EXPECT_NE(refused.find("bound to pid " + std::to_string(target.child.pid())), std::string::npos);
  // The intended target still gets it.
  target.send(info.format());
  EXPECT_EQ(target.child.wait_ready(), ok_line(tcp.server.borrow()));
  target.finish();
  other.finish();
}

TEST_F(Grant, R17_DifferentProcessWithSameUidAndTheTokenIsRefusedByTheSource) {
  EventLog log;
  GrantServer server({.on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid()));
  // This process is not the target: it skips redeem()'s own check and speaks the protocol
  // directly with the right token, as an attacker who read the info would.
  Channel channel = Channel::connect(info.grant_endpoint(), 5s);
  const auto request = redeem_request(info);
  channel.send({.type = gp::kRedeem, .payload = request}, 5s);
  Message reply = channel.receive({.max_fds = 0}, 5s);
  EXPECT_EQ(reply.type, gp::kRefused);
  EXPECT_NE(reply.payload_text().find("R17"), std::string::npos) << reply.payload_text();
  ASSERT_TRUE(log.wait_for(1));
  auto events = log.take();
  EXPECT_EQ(events.at(0).outcome, GrantOutcome::refused);
  EXPECT_EQ(server.stats().refused, 1u);
  // Single use: the presentation consumed the grant, so the real target is refused too.
  target.send(info.format());
  const std::string line = target.child.wait_ready();
  EXPECT_NE(line.find("no such grant"), std::string::npos) << line;
  target.finish();
}

TEST_F(Grant, R17_ForcedPidReuse_ANewProcessWithTheTargetsPidIsRefused) {
  EventLog log;
  GrantServer server({.on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  Redeemer first = Redeemer::start();
  const pid_t pid = first.child.pid();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::pid(pid));
  first.child.kill(SIGKILL);
  EXPECT_EQ(first.child.wait_exit(), 128 + SIGKILL);
  // The grant dies with its target: the pidfd reported the exit.
  ASSERT_TRUE(log.wait_for(1));
  EXPECT_EQ(log.take().at(0).outcome, GrantOutcome::target_exited);
  // Force the kernel to hand the same pid to a new process (root only; other processes
  // may take the pid first, so try a few times).
  Redeemer second;
  for (int attempt = 0; attempt < 20 && second.child.pid() != pid; ++attempt) {
    {
      std::ofstream last("/proc/sys/kernel/ns_last_pid");
      if (!last) GTEST_SKIP() << "cannot write /proc/sys/kernel/ns_last_pid (not root?)";
      last << pid - 1;
    }
    second = Redeemer::start();
  }
  if (second.child.pid() != pid) GTEST_SKIP() << "could not force the reuse of pid " << pid;
  // Same pid, same uid, the real token: still not the process the grant was made for.
  second.send(info.format());
  const std::string line = second.child.wait_ready();
  EXPECT_EQ(line.rfind("err refused", 0), 0u) << line;
  EXPECT_NE(line.find("bound to pid " + std::to_string(pid) + ", not to this process (pid " +
                      std::to_string(pid) + ")"),
            std::string::npos)
      << line;
  second.finish();
}

// ---- S2: the info travels by any IPC ------------------------------------------------------

class GrantSpawn : public FdLeakTest, public ::testing::WithParamInterface<InfoPassing> {};

TEST_P(GrantSpawn, S2_InfoThroughArgvEnvironmentOrPipeToASpawnedChild) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  const InfoPassing passing = GetParam();
  const std::string name = passing == InfoPassing::argument      ? "argument"
                           : passing == InfoPassing::environment ? "environment"
                                                                 : "pipe";
  SpawnedChild child =
      spawn_with_socket(server, tcp.server.borrow(),
                        {.argv = {test::self_exe(), "--sockshare-helper", "spawned_redeemer", name},
                         .passing = passing});
  EXPECT_EQ(child.info.target_pid, child.pid);
  // The child answers through the socket it redeemed: the remote peer reads it.
  const auto reply = read_within(tcp.client.borrow(), 10s);
  ASSERT_TRUE(reply.has_value());
  std::string inheritable;
  for (int fd : test::open_fds()) {
    if (fd > 2 && (::fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0) inheritable += std::to_string(fd) + ",";
  }
  EXPECT_EQ(*reply, name + " fds=" + inheritable);
  siginfo_t status{};
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(child.pid), &status, WEXITED), 0);
  EXPECT_EQ(status.si_code, CLD_EXITED);
  EXPECT_EQ(status.si_status, 0);
}

INSTANTIATE_TEST_SUITE_P(Passing, GrantSpawn,
                         ::testing::Values(InfoPassing::argument, InfoPassing::environment,
                                           InfoPassing::pipe),
                         [](const ::testing::TestParamInfo<InfoPassing>& param) {
                           switch (param.param) {
                             case InfoPassing::argument:
                               return std::string("Argv");
                             case InfoPassing::environment:
                               return std::string("Environment");
                             case InfoPassing::pipe:
                               return std::string("Pipe");
                           }
                           return std::string("Unknown");
                         });

TEST_F(Grant, S2_InfoThroughAFileAndThroughAPipe) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer by_file = Redeemer::start("file");
  Redeemer by_pipe = Redeemer::start("pipe");
  const std::string path = "/tmp/sockshare-grant-test-" + std::to_string(::getpid()) + ".info";
  {
    std::ofstream file(path);
    file << server.duplicate(tcp.server.borrow(), Target::pid(by_file.child.pid())).format()
         << "\n";
  }
  by_file.send(path);
  EXPECT_EQ(by_file.child.wait_ready(), ok_line(tcp.server.borrow()));
  ::unlink(path.c_str());
  by_pipe.send(server.duplicate(tcp.server.borrow(), Target::pid(by_pipe.child.pid())).format());
  EXPECT_EQ(by_pipe.child.wait_ready(), ok_line(tcp.server.borrow()));
  by_file.finish();
  by_pipe.finish();
}

// ---- S3: the same underlying socket ---------------------------------------------------------

TEST_F(Grant, S3_RedeemedDescriptorIsTheSameSocket_SameInodeAndIoThroughIt) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  // "ok <st_ino> <cookie>": fstat in the other process sees the inode we see.
  const std::string line = target.child.wait_ready();
  std::istringstream in(line);
  std::string ok;
  std::uint64_t inode = 0;
  in >> ok >> inode;
  EXPECT_EQ(ok, "ok");
  EXPECT_EQ(inode, inode_of(tcp.server.borrow()));
  write_all(tcp.client.borrow(), "ping");
  EXPECT_EQ(target.ask("echo"), "echoed");
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "echo:ping");
  target.finish();
}

// ---- S4: threads share a descriptor without duplication -----------------------------------

TEST_F(Grant, S4_TwoThreadsUseOneDescriptorWithoutDuplication) {
  // Threads of one process share the descriptor table: the same number works in every
  // thread, no duplicate() needed. One thread writes through fd `a` while another reads
  // through the same fd `a`; no descriptor is created meanwhile.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd a(sv[0]);
  Fd b(sv[1]);
  const auto before = test::open_fds().size();
  constexpr int kRounds = 200;
  std::atomic<int> received{0};
  std::thread reader([&] {
    char c;
    for (int i = 0; i < kRounds; ++i) {
      if (::read(a.get(), &c, 1) == 1) ++received;
    }
  });
  std::thread writer([&] {
    for (int i = 0; i < kRounds; ++i) (void)!::write(a.get(), "w", 1);
  });
  for (int i = 0; i < kRounds; ++i) ASSERT_EQ(::write(b.get(), "r", 1), 1);
  writer.join();
  reader.join();
  EXPECT_EQ(received.load(), kRounds);
  int drained = 0;
  char buffer[kRounds];
  while (drained < kRounds) {
    const ssize_t n = ::read(b.get(), buffer, sizeof buffer);
    ASSERT_GT(n, 0);
    drained += static_cast<int>(n);
  }
  EXPECT_EQ(test::open_fds().size(), before);
}

TEST_F(Grant, S4_GrantServerMethodsAreSafeFromManyThreads) {
  GrantServer server({.max_grants = 4096, .max_grants_per_target = 4096});
  TcpPair tcp = tcp_pair();
  std::atomic<int> revoked{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self());
        (void)server.stats();
        if (server.revoke(info)) ++revoked;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(revoked.load(), 200);
  EXPECT_EQ(server.stats().pending, 0u);
}

// ---- S5: independent I/O; move closes the source's copy only after the ack ----------------

TEST_F(Grant, S5_TwoProcessesReadAndWriteTheSameConnection) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  EXPECT_EQ(target.ask("write from-target;"), "written");
  write_all(tcp.server.borrow(), "from-source;");
  std::string seen;
  while (seen.size() < std::string("from-target;from-source;").size()) {
    auto more = read_within(tcp.client.borrow(), 5s);
    ASSERT_TRUE(more && !more->empty());
    seen += *more;
  }
  EXPECT_EQ(seen, "from-target;from-source;");
  // And the peer's bytes can be read by either holder: here the target reads them.
  write_all(tcp.client.borrow(), "to-either");
  EXPECT_EQ(target.ask("echo"), "echoed");
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "echo:to-either");
  target.finish();
}

TEST_F(Grant, S5_MoveClosesTheSourceCopyOnlyAfterTheAck) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.move(std::move(tcp.server), Target::self());
  EXPECT_FALSE(tcp.server.valid());
  EXPECT_EQ(info.mode, ShareMode::move);
  // Speak the protocol by hand so the ack can be held back.
  Channel channel = Channel::connect(info.grant_endpoint(), 5s);
  const auto request = redeem_request(info);
  channel.send({.type = gp::kRedeem, .payload = request}, 5s);
  std::optional<Message> reply;
  serve_until(server, [&] {
    return (reply = channel.try_receive({.expect = Expect::any_socket})).has_value();
  });
  ASSERT_TRUE(reply.has_value());
  ASSERT_EQ(reply->type, gp::kSocket);
  ASSERT_EQ(reply->fds.size(), 1u);
  EXPECT_EQ(identify(reply->fds[0].borrow()).cookie, info.cookie);
  reply->fds.clear();  // the received copy is gone: only the source's copy remains
  server.process_events();
  EXPECT_EQ(read_within(tcp.client.borrow(), 200ms), std::nullopt) << "FIN before the ack";
  EXPECT_EQ(server.stats().in_progress, 1u);
  channel.send({.type = gp::kAck}, 5s);
  serve_until(server, [&] { return server.stats().redeemed == 1; });
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "") << "the source kept its copy after the ack";
  ASSERT_TRUE(log.wait_for(1));
  EXPECT_EQ(log.take().at(0).outcome, GrantOutcome::redeemed);
}

TEST_F(Grant, S5_MoveWithoutAnAckFailsAndHandsTheSocketBack) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.move(std::move(tcp.server), Target::self());
  {
    Channel channel = Channel::connect(info.grant_endpoint(), 5s);
    const auto request = redeem_request(info);
    channel.send({.type = gp::kRedeem, .payload = request}, 5s);
    std::optional<Message> reply;
    serve_until(server, [&] {
      return (reply = channel.try_receive({.expect = Expect::any_socket})).has_value();
    });
    ASSERT_TRUE(reply.has_value());
    ASSERT_EQ(reply->fds.size(), 1u);
  }  // the redeemer vanishes with the descriptor and without acknowledging
  serve_until(server, [&] { return server.stats().failed == 1; });
  ASSERT_TRUE(log.wait_for(1, 0ms));
  auto events = log.take();
  EXPECT_EQ(events.at(0).outcome, GrantOutcome::failed);
  ASSERT_TRUE(events.at(0).returned.valid()) << "an unacknowledged move must not lose the socket";
  // Still the live connection: the peer hears from the returned descriptor.
  write_all(events.at(0).returned.borrow(), "still here");
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "still here");
}

// ---- S6: one process accepts, a worker serves ------------------------------------------

TEST_F(Grant, S6_AcceptorHandsEachConnectionToAWorker) {
  GrantServer server;
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"), {.backlog = 8, .nonblocking = false});
  auto [r, w] = test::make_pipe();
  Child worker = Child::helper("worker", {.args = {}, .inherit = {r.borrow()}, .env = {}});
  r.reset();
  ASSERT_EQ(worker.wait_ready(), "worker");
  for (int i = 0; i < 3; ++i) {
    Fd client = connect_to(local_endpoint(listener.borrow()));
    Fd accepted(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    ASSERT_TRUE(accepted.valid());
    const SocketInfo info = server.move(std::move(accepted), Target::pid(worker.pid()));
    write_all(w.borrow(), info.format() + "\n");
    write_all(client.borrow(), "request-" + std::to_string(i));
    EXPECT_EQ(worker.wait_ready(), "served");
    EXPECT_EQ(read_within(client.borrow(), 5s), "served:request-" + std::to_string(i));
    // The worker closed its copy and the acceptor gave up its own at the ack: EOF.
    EXPECT_EQ(read_within(client.borrow(), 5s), "");
  }
  w.reset();
  EXPECT_EQ(worker.wait_exit(), 0);
}

// ---- S7: socket state is shared, descriptor flags are not -----------------------------------

TEST_F(Grant, S7_SocketOptionsSetInOneProcessAreSeenInTheOther) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  const int fd = tcp.server.get();
  const int rcvbuf = 50000;
  const int on = 1;
  ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf), 0);
  ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on), 0);
  ASSERT_EQ(::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on), 0);
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  const int kernel_rcvbuf =
      *sys::get_int_option(fd, SOL_SOCKET, SO_RCVBUF);  // doubled by the kernel
  EXPECT_EQ(target.ask("options"), std::to_string(kernel_rcvbuf) + " 1 1");
  // The other way round, plus the flags: O_NONBLOCK is shared (open file description),
  // FD_CLOEXEC is per descriptor.
  ASSERT_EQ(::fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(target.ask("setflags"), "set");
  EXPECT_NE(::fcntl(fd, F_GETFL) & O_NONBLOCK, 0) << "O_NONBLOCK should be shared (R14)";
  EXPECT_NE(::fcntl(fd, F_GETFD) & FD_CLOEXEC, 0) << "FD_CLOEXEC must stay per descriptor";
  EXPECT_EQ(*sys::get_int_option(fd, SOL_SOCKET, SO_SNDBUF), 12000);
  target.finish();
}

// ---- S8: the socket lives until the last descriptor closes ---------------------------------

TEST_F(Grant, S8_PeerSeesNoFinUntilTheLastHolderCloses) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  tcp.server.reset();  // the source closes its descriptor
  EXPECT_EQ(read_within(tcp.client.borrow(), 200ms), std::nullopt)
      << "FIN while the target holds it";
  EXPECT_EQ(target.ask("close"), "closed");
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "") << "no FIN after the last close";
  target.finish();
}

TEST_F(Grant, S8_ShutdownThroughAnyDescriptorAffectsAll) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  EXPECT_EQ(target.ask("shutdown"), "shut");
  // The source still holds a descriptor, yet the peer sees EOF and the source cannot send.
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "");
  EXPECT_LT(::send(tcp.server.get(), "x", 1, MSG_NOSIGNAL), 0);
  EXPECT_EQ(errno, EPIPE);
  target.finish();
}

// ---- S9: independent readiness registrations per process ------------------------------------

TEST_F(Grant, S9_OneProcessWaitsReadableWhileAnotherWaitsWritable) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  target.send(server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid())).format());
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  Fd ep(::epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(::epoll_ctl(ep.get(), EPOLL_CTL_ADD, tcp.server.get(), &ev), 0);
  // The target registers for writability after us; on Windows that would cancel ours.
  target.send("epollout");
  EXPECT_EQ(target.child.wait_ready(), "registered");
  EXPECT_EQ(target.child.wait_ready(), "writable");
  write_all(tcp.client.borrow(), "r");
  epoll_event out{};
  ASSERT_EQ(::epoll_wait(ep.get(), &out, 1, 5000), 1);
  EXPECT_NE(out.events & EPOLLIN, 0u);
  target.finish();
}

// ---- R18: the redeemer checks who serves the endpoint --------------------------------------

TEST_F(Grant, R18_SquatterOnTheSourceEndpointIsRefusedAndSeesNoToken) {
  TcpPair tcp = tcp_pair();
  SocketInfo info;
  {
    GrantServer server;
    info = server.duplicate(tcp.server.borrow(), Target::self());
  }  // the source's server is gone and its name free
  Child squatter =
      Child::helper("squatter", {.args = {info.grant_endpoint().path}, .inherit = {}, .env = {}});
  ASSERT_EQ(squatter.wait_ready(), "bound");
  expect_error([&] { (void)redeem(info); }, ErrorKind::refused, "squatter");
  EXPECT_EQ(squatter.wait_ready(), "nothing");
  EXPECT_EQ(squatter.wait_exit(), 0);
}

// ---- R19: single use, expiry, revocation, reaping, quotas -----------------------------------

TEST_F(Grant, R19_ReplayOfARedeemedGrantIsRefused) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self());
  Fd first = redeem(info);
  EXPECT_EQ(identify(first.borrow()).cookie, info.cookie);
  expect_error([&] { (void)redeem(info); }, ErrorKind::refused, "no such grant");
}

TEST_F(Grant, R19_ExpiredGrantIsReapedAndRefused) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self(), {.ttl = 50ms});
  // No polling loop of our own: the server's descriptor wakes us at the expiry.
  pollfd p{server.native_handle().get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  server.process_events();
  EXPECT_EQ(server.stats().expired, 1u);
  EXPECT_EQ(server.stats().pending, 0u);
  ASSERT_TRUE(log.wait_for(1, 0ms));
  EXPECT_EQ(log.take().at(0).outcome, GrantOutcome::expired);
  expect_error([&] { (void)redeem(info); }, ErrorKind::refused, "expired");
  // The source refuses it too, whatever the redeemer's clock says.
  Channel channel = Channel::connect(info.grant_endpoint(), 5s);
  const auto request = redeem_request(info);
  channel.send({.type = gp::kRedeem, .payload = request}, 5s);
  std::optional<Message> reply;
  serve_until(server, [&] { return (reply = channel.try_receive()).has_value(); });
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(reply->type, gp::kRefused);
}

TEST_F(Grant, R19_RevokedGrantIsRefusedAndGivesTheDescriptorBack) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.move(std::move(tcp.server), Target::self());
  std::optional<Fd> back = server.revoke(info);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(identify(back->borrow()).cookie, info.cookie);
  EXPECT_FALSE(server.revoke(info).has_value());
  expect_error([&] { (void)redeem(info); }, ErrorKind::refused, "no such grant");
}

TEST_F(Grant, R19_GrantForATargetThatDiesIsReapedWithoutLeaks) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start();
  const SocketInfo info = server.move(std::move(tcp.server), Target::pid(target.child.pid()),
                                      {.ttl = std::chrono::minutes(10)});
  target.child.kill(SIGKILL);
  EXPECT_EQ(target.child.wait_exit(), 128 + SIGKILL);
  // The target's pidfd wakes the server long before the ten-minute expiry.
  pollfd p{server.native_handle().get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  server.process_events();
  EXPECT_EQ(server.stats().target_exited, 1u);
  EXPECT_EQ(server.stats().pending, 0u);
  ASSERT_TRUE(log.wait_for(1, 0ms));
  auto events = log.take();
  EXPECT_EQ(events.at(0).outcome, GrantOutcome::target_exited);
  // A move grant that was not redeemed hands the socket back rather than losing it.
  ASSERT_TRUE(events.at(0).returned.valid());
  EXPECT_EQ(identify(events.at(0).returned.borrow()).cookie, info.cookie);
}

TEST_F(Grant, R19_PerTargetQuotaAndTableBoundRefuseWithOverloaded) {
  GrantServer server({.max_grants = 3, .max_grants_per_target = 2});
  TcpPair tcp = tcp_pair();
  Redeemer other = Redeemer::start();
  (void)server.duplicate(tcp.server.borrow(), Target::self());
  (void)server.duplicate(tcp.server.borrow(), Target::self());
  expect_error([&] { (void)server.duplicate(tcp.server.borrow(), Target::self()); },
               ErrorKind::overloaded, "quota");
  (void)server.duplicate(tcp.server.borrow(), Target::pid(other.child.pid()));
  expect_error([&] { (void)server.duplicate(tcp.server.borrow(), Target::pid(other.child.pid())); },
               ErrorKind::overloaded, "table full");
  other.finish();
}

TEST_F(Grant, R19_TargetThatDoesNotExistIsRefusedAtDuplicate) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer gone = Redeemer::start();
  const pid_t pid = gone.child.pid();
  gone.child.kill(SIGKILL);
  (void)gone.child.wait_exit();
  expect_error([&] { (void)server.duplicate(tcp.server.borrow(), Target::pid(pid)); },
               ErrorKind::refused, "does not exist");
}

TEST_F(Grant, R19_SilentRedeemerIsDroppedAtItsDeadlineAndBlocksNobody) {
  GrantServer server({.session_timeout = 100ms});
  TcpPair tcp = tcp_pair();
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self());
  Channel silent = Channel::connect(info.grant_endpoint(), 5s);
  // Another redemption proceeds while the silent connection is open.
  Fd socket = redeem(info);
  EXPECT_EQ(identify(socket.borrow()).cookie, info.cookie);
  expect_error([&] { (void)silent.receive({.max_fds = 0}, 5s); }, ErrorKind::peer_gone, "closed");
}

// ---- R20: the pidfd_getfd fast path ---------------------------------------------------------

TEST_F(Grant, R20_FastPathTakesTheDescriptorWithPidfdGetfd) {
  if (!pidfd_getfd_possible()) GTEST_SKIP() << "pidfd_getfd is not permitted in this environment";
  Redeemer target = Redeemer::start("pipe", "fast");
  Child source = Child::helper(
      "grant_source",
      {.args = {std::to_string(target.child.pid()), "dumpable"}, .inherit = {}, .env = {}});
  const std::string info = source.wait_ready();
  ASSERT_EQ(info.rfind("info ", 0), 0u) << info;
  target.send(info.substr(5));
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  EXPECT_EQ(source.wait_ready(), "done redeemed fast=1");
  EXPECT_EQ(source.wait_exit(), 0);
  target.finish();
}

TEST_F(Grant, R20_FastPathRefusedByTheKernelFallsBackToScmRights) {
  // A non-dumpable source and a redeemer without CAP_SYS_PTRACE: pidfd_getfd gets EPERM.
  Redeemer target = Redeemer::start("pipe", "fast-nocap");
  Child source = Child::helper(
      "grant_source",
      {.args = {std::to_string(target.child.pid()), "nondumpable"}, .inherit = {}, .env = {}});
  const std::string info = source.wait_ready();
  ASSERT_EQ(info.rfind("info ", 0), 0u) << info;
  target.send(info.substr(5));
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  EXPECT_EQ(source.wait_ready(), "done redeemed fast=0");
  EXPECT_EQ(source.wait_exit(), 0);
  target.finish();
}

TEST_F(Grant, R20_CookieMismatchOnTheFastPathFallsBackAndAWrongSocketIsRejected) {
  // A source that lies: it names a descriptor number, then sends, for another socket.
  TcpPair granted = tcp_pair();
  TcpPair decoy = tcp_pair();
  const std::string name = "sockshare-test-liar-" + std::to_string(::getpid());
  auto listener = ChannelListener::listen(parse_endpoint("unix:@" + name));
  GrantServer real;  // only to mint a well-formed info for this process
  SocketInfo info = real.duplicate(granted.server.borrow(), Target::self());
  info.endpoint.fill('\0');
  const std::string at = "@" + name;
  std::memcpy(info.endpoint.data(), at.data(), at.size());

  std::atomic<bool> got_fallback{false};
  std::atomic<bool> got_reject{false};
  std::thread liar([&] {
    try {
      Channel channel = listener.accept(5s);
      Message request = channel.receive({.max_fds = 0}, 5s);
      std::byte number[12] = {};
      const int decoy_fd = decoy.server.get();
      std::memcpy(number, &decoy_fd, 4);
      channel.send({.type = gp::kNumber, .payload = number}, 5s);
      Message fallback = channel.receive({.max_fds = 0}, 5s);
      got_fallback = fallback.type == gp::kFallback;
      const BorrowedFd fds[] = {decoy.server.borrow()};
      channel.send({.type = gp::kSocket, .payload = std::span(number, 8), .fds = fds}, 5s);
      Message reject = channel.receive({.max_fds = 0}, 5s);
      got_reject = reject.type == gp::kReject;
    } catch (const Error&) {
    }
  });
  expect_error([&] { (void)redeem(info, {.fast_path = true}); }, ErrorKind::protocol, "cookie");
  liar.join();
  EXPECT_TRUE(got_fallback.load()) << "a descriptor with the wrong cookie must not be used";
  EXPECT_TRUE(got_reject.load());
}

TEST_F(Grant, R20_SourceThatExitedGivesAClearError) {
  Child source = Child::helper(
      "grant_source", {.args = {std::to_string(::getpid()), "exit"}, .inherit = {}, .env = {}});
  const std::string line = source.wait_ready();
  ASSERT_EQ(line.rfind("info ", 0), 0u) << line;
  EXPECT_EQ(source.wait_exit(), 0);
  const SocketInfo info = SocketInfo::parse(line.substr(5));
  expect_error([&] { (void)redeem(info); }, ErrorKind::peer_gone,
               "source process (pid " + std::to_string(info.source_pid) + ") has exited");
}

TEST_F(Grant, R15_InfoForAnotherKindOfSocketIsRejectedBeforeUse) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self());
  // The token is valid but the info claims a UDP socket: what arrives does not match.
  info.type = SOCK_DGRAM;
  info.protocol = IPPROTO_UDP;
  expect_error([&] { (void)redeem(info); }, ErrorKind::protocol, "another kind of socket");
}

}  // namespace
}  // namespace sockshare
