// Direct redemption (GrantOptions::direct + RedeemOptions::direct): the target takes the
// source's held duplicate with pidfd_getfd and sends the source nothing. What is still
// checked (target identity, expiry, source identity R17, socket cookie R20), what falls back
// to the channel, and what the source sees (nothing until expiry: `lapsed`).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>

#include <string>

#include "grant_support.hpp"

namespace sockshare {
namespace {

using namespace grant_test;
using namespace std::chrono_literals;
using test::Child;
using test::FdLeakTest;

class GrantDirect : public FdLeakTest {};

constexpr GrantOptions kDirect{.ttl = std::chrono::seconds(30), .direct = true};

RedeemOptions direct_only(DirectSourceCache& cache) {
  return {.direct = true, .direct_fallback = false, .sources = &cache};
}

// ---- S3: the same socket, and the source is never contacted --------------------------------

TEST_F(GrantDirect, S3_DirectRedemptionTakesTheSameSocketWithoutContactingTheSource) {
  if (!pidfd_getfd_possible()) GTEST_SKIP() << "pidfd_getfd is not permitted in this environment";
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start("pipe", "direct-only");
  const SocketInfo info =
      server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid()), kDirect);
  ASSERT_NE(info.flags & SocketInfo::kFlagDirect, 0);
  ASSERT_GE(info.source_fd, 0);
  EXPECT_NE(info.source_fd, tcp.server.get()) << "the info names the grant's own duplicate";
  target.send(info.format());
  // Same inode and cookie in the other process: the same underlying socket.
  EXPECT_EQ(target.child.wait_ready(), ok_line(tcp.server.borrow()));
  // The source saw nothing: the grant is still pending, nothing was redeemed or refused.
  const GrantServerStats stats = server.stats();
  EXPECT_EQ(stats.redeemed, 0u);
  EXPECT_EQ(stats.refused, 0u);
  EXPECT_EQ(stats.pending, 1u);
  write_all(tcp.client.borrow(), "ping");
  EXPECT_EQ(target.ask("echo"), "echoed");
  EXPECT_EQ(read_within(tcp.client.borrow(), 5s), "echo:ping");
  target.finish();
}

TEST_F(GrantDirect, S5_MoveCannotBeDirect) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  expect_error([&] { (void)server.move(std::move(tcp.server), Target::self(), kDirect); },
               ErrorKind::invalid_input, "share grants only");
  EXPECT_TRUE(tcp.server.valid()) << "a failed move leaves the caller its descriptor";
  EXPECT_EQ(server.stats().pending, 0u);
}

// ---- S1 / R17: the redeemer refuses a grant that is not its own ----------------------------

TEST_F(GrantDirect, S1_DirectGrantPresentedByAnotherProcessIsRefusedByTheRedeemer) {
  if (!pidfd_getfd_possible()) GTEST_SKIP() << "pidfd_getfd is not permitted in this environment";
  GrantServer server;
  TcpPair tcp = tcp_pair();
  Redeemer target = Redeemer::start("pipe", "direct-only");
  Redeemer other = Redeemer::start("pipe", "direct-only");
  const SocketInfo info =
      server.duplicate(tcp.server.borrow(), Target::pid(target.child.pid()), kDirect);
  other.send(info.format());
  const std::string refused = other.child.wait_ready();
  EXPECT_EQ(refused.rfind("err refused", 0), 0u) << refused;
  EXPECT_NE(refused.find("bound to pid " + std::to_string(target.child.pid())), std::string::npos)
      << refused;
  // Refused before the source was touched: the grant is intact for its target.
  EXPECT_EQ(server.stats().pending, 1u);
  target.send(info.format());
  EXPECT_EQ(target.child.wait_ready(), ok_line(tcp.server.borrow()));
  target.finish();
  other.finish();
}

// ---- R19: expiry, lapse, revocation ---------------------------------------------------------

TEST_F(GrantDirect, R19_ExpiredDirectGrantIsRefusedLocallyAndTheSourceClosesItsDuplicate) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  DirectSourceCache cache;
  const SocketInfo info =
      server.duplicate(tcp.server.borrow(), Target::self(), {.ttl = 0ms, .direct = true});
  expect_error([&] { (void)redeem(info, direct_only(cache)); }, ErrorKind::refused, "expired");
  EXPECT_EQ(cache.size(), 0u) << "an expired grant must not even open the source's pidfd";
  // The source's timer fires at the expiry; the duplicate it held is closed then.
  pollfd p{server.native_handle().get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  server.process_events();
  EXPECT_EQ(server.stats().lapsed, 1u);
  EXPECT_EQ(server.stats().expired, 0u);
  EXPECT_EQ(server.stats().pending, 0u);
  ASSERT_TRUE(log.wait_for(1, 0ms));
  EXPECT_EQ(log.take().at(0).outcome, GrantOutcome::lapsed);
  EXPECT_EQ(::fcntl(info.source_fd, F_GETFD), -1) << "the held duplicate is still open";
}

TEST_F(GrantDirect, R19_DirectGrantLapsesAtExpiryAfterADirectRedemption) {
  EventLog log;
  GrantServer server({.background_thread = false, .on_event = log.callback()});
  TcpPair tcp = tcp_pair();
  DirectSourceCache cache;
  const SocketInfo info =
      server.duplicate(tcp.server.borrow(), Target::self(), {.ttl = 500ms, .direct = true});
  {
    Fd taken = redeem(info, direct_only(cache));
    EXPECT_EQ(identify(taken.borrow()).cookie, info.cookie);
  }
  EXPECT_EQ(server.stats().pending, 1u);
  pollfd p{server.native_handle().get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  server.process_events();
  ASSERT_TRUE(log.wait_for(1, 0ms));
  const auto events = log.take();
  EXPECT_EQ(events.at(0).outcome, GrantOutcome::lapsed);
  EXPECT_NE(events.at(0).detail.find("cannot tell"), std::string::npos) << events.at(0).detail;
  EXPECT_EQ(::fcntl(info.source_fd, F_GETFD), -1) << "the held duplicate is still open";
  // Later attempts are refused locally, before the source is touched.
  expect_error([&] { (void)redeem(info, direct_only(cache)); }, ErrorKind::refused, "expired");
}

TEST_F(GrantDirect, R19_RevokedDirectGrantCannotBeTakenEvenWhileTheReturnedCopyIsKept) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  DirectSourceCache cache;
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self(), kDirect);
  std::optional<Fd> back = server.revoke(info);
  ASSERT_TRUE(back.has_value());
  ASSERT_TRUE(back->valid());
  EXPECT_EQ(identify(back->borrow()).cookie, info.cookie);
  EXPECT_NE(back->get(), info.source_fd) << "the revoked number must stop naming the socket";
  expect_error([&] { (void)redeem(info, direct_only(cache)); }, ErrorKind::refused,
               "revoked or expired");
  // With the fallback the channel is asked, and the source no longer knows the grant.
  expect_error([&] { (void)redeem(info, {.direct = true, .sources = &cache}); }, ErrorKind::refused,
               "no such grant");
}

// ---- R20: the number is only a name; the cookie decides ------------------------------------

TEST_F(GrantDirect, R20_DescriptorNumberReusedByAnotherSocketIsRefusedByTheCookie) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  TcpPair other = tcp_pair();
  DirectSourceCache cache;
  const SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self(), kDirect);
  (void)server.revoke(info);  // closes the number the info names
  // Another socket now sits at exactly that number, as after an unlucky reuse.
  Fd squatter(::fcntl(other.server.get(), F_DUPFD_CLOEXEC, info.source_fd));
  ASSERT_EQ(squatter.get(), info.source_fd);
  expect_error([&] { (void)redeem(info, direct_only(cache)); }, ErrorKind::refused,
               "socket cookie differs");
}

TEST_F(GrantDirect, R15_InfoForAnotherKindOfSocketIsRefusedOnTheDirectPath) {
  GrantServer server;
  TcpPair tcp = tcp_pair();
  DirectSourceCache cache;
  SocketInfo info = server.duplicate(tcp.server.borrow(), Target::self(), kDirect);
  info.type = SOCK_DGRAM;
  info.protocol = IPPROTO_UDP;
  expect_error([&] { (void)redeem(info, direct_only(cache)); }, ErrorKind::refused,
               "another kind of socket");
  // Also once the socket's kind is already known to the cache from a good redemption.
  SocketInfo good = server.duplicate(tcp.server.borrow(), Target::self(), kDirect);
  { Fd taken = redeem(good, direct_only(cache)); }
  good.type = SOCK_DGRAM;
  expect_error([&] { (void)redeem(good, direct_only(cache)); }, ErrorKind::refused,
               "another kind of socket");
}

TEST_F(GrantDirect, R20_PidfdGetfdRefusedByTheKernelFallsBackToTheChannel) {
  // A non-dumpable source and a redeemer without CAP_SYS_PTRACE: pidfd_getfd gets EPERM.
  Redeemer target = Redeemer::start("pipe", "direct-nocap");
  Child source = Child::helper(
      "grant_source", {.args = {std::to_string(target.child.pid()), "nondumpable", "direct"},
                       .inherit = {},
                       .env = {}});
  const std::string line = source.wait_ready();
  ASSERT_EQ(line.rfind("info ", 0), 0u) << line;
  ASSERT_NE(SocketInfo::parse(line.substr(5)).flags & SocketInfo::kFlagDirect, 0);
  target.send(line.substr(5));
  EXPECT_EQ(target.child.wait_ready().rfind("ok", 0), 0u);
  // The source served it over the channel (SCM_RIGHTS): a direct redemption reports nothing.
  EXPECT_EQ(source.wait_ready(), "done redeemed fast=0");
  EXPECT_EQ(source.wait_exit(), 0);
  target.finish();
}

TEST_F(GrantDirect, R20_PidfdGetfdRefusedWithoutFallbackIsRefusedWithTheKernelsReason) {
  Redeemer target = Redeemer::start("pipe", "direct-only-nocap");
  Child source = Child::helper(
      "grant_source", {.args = {std::to_string(target.child.pid()), "nondumpable", "direct"},
                       .inherit = {},
                       .env = {}});
  const std::string line = source.wait_ready();
  ASSERT_EQ(line.rfind("info ", 0), 0u) << line;
  target.send(line.substr(5));
  const std::string refused = target.child.wait_ready();
  EXPECT_EQ(refused.rfind("err refused", 0), 0u) << refused;
  EXPECT_NE(refused.find("no ptrace rights over the source"), std::string::npos) << refused;
  source.kill(SIGKILL);
  EXPECT_EQ(source.wait_exit(), 128 + SIGKILL);
  target.finish();
}

// ---- R17: the source's identity, its exit, and the pidfd cache -----------------------------

TEST_F(GrantDirect, R17_DirectFromASourceThatExitedGivesAClearError) {
  DirectSourceCache cache;
  Child source = Child::helper(
      "grant_source",
      {.args = {std::to_string(::getpid()), "exit", "direct"}, .inherit = {}, .env = {}});
  const std::string line = source.wait_ready();
  ASSERT_EQ(line.rfind("info ", 0), 0u) << line;
  EXPECT_EQ(source.wait_exit(), 0);
  const SocketInfo info = SocketInfo::parse(line.substr(5));
  ASSERT_NE(info.flags & SocketInfo::kFlagDirect, 0);
  expect_error([&] { (void)redeem(info, {.direct = true, .sources = &cache}); },
               ErrorKind::peer_gone,
               "source process (pid " + std::to_string(info.source_pid) + ") has exited");
  EXPECT_EQ(cache.size(), 0u);
}

TEST_F(GrantDirect, R17_CachedSourcePidfdIsReusedAndDroppedWhenTheSourceExits) {
  if (!pidfd_getfd_possible()) GTEST_SKIP() << "pidfd_getfd is not permitted in this environment";
  DirectSourceCache cache;
  auto [r, w] = test::make_pipe();
  Child source = Child::helper(
      "grant_source",
      {.args = {std::to_string(::getpid()), "hold", "direct"}, .inherit = {r.borrow()}, .env = {}});
  r.reset();
  const std::string first = source.wait_ready();
  const std::string second = source.wait_ready();
  ASSERT_EQ(first.rfind("info ", 0), 0u) << first;
  ASSERT_EQ(second.rfind("info ", 0), 0u) << second;
  const SocketInfo a = SocketInfo::parse(first.substr(5));
  const SocketInfo b = SocketInfo::parse(second.substr(5));
  {
    Fd taken = redeem(a, direct_only(cache));
    EXPECT_EQ(identify(taken.borrow()).cookie, a.cookie);
    EXPECT_EQ(cache.size(), 1u);
    // Single use is not enforced against the target itself (documented): it may take the
    // same grant again, through the same cached pidfd.
    Fd again = redeem(a, direct_only(cache));
    EXPECT_EQ(identify(again.borrow()).cookie, a.cookie);
    EXPECT_EQ(cache.size(), 1u);
  }
  w.reset();  // the source exits at end of file
  EXPECT_EQ(source.wait_exit(), 0);
  expect_error([&] { (void)redeem(b, direct_only(cache)); }, ErrorKind::peer_gone,
               "source process (pid " + std::to_string(b.source_pid) + ") has exited");
  EXPECT_EQ(cache.size(), 0u) << "the exited source's pidfd stayed cached";
}

TEST_F(GrantDirect, R17_CacheIsBoundedAndClearReleasesEveryPidfd) {
  if (!pidfd_getfd_possible()) GTEST_SKIP() << "pidfd_getfd is not permitted in this environment";
  DirectSourceCache cache(1);
  GrantServer server;
  TcpPair tcp = tcp_pair();
  const SocketInfo mine = server.duplicate(tcp.server.borrow(), Target::self(), kDirect);
  { Fd taken = redeem(mine, direct_only(cache)); }
  EXPECT_EQ(cache.size(), 1u);
  // A second source (another pid) takes the only slot.
  auto [r, w] = test::make_pipe();
  Child source = Child::helper(
      "grant_source",
      {.args = {std::to_string(::getpid()), "hold", "direct"}, .inherit = {r.borrow()}, .env = {}});
  r.reset();
  const std::string line = source.wait_ready();
  (void)source.wait_ready();
  ASSERT_EQ(line.rfind("info ", 0), 0u) << line;
  {
    Fd taken = redeem(SocketInfo::parse(line.substr(5)), direct_only(cache));
    EXPECT_TRUE(taken.valid());
    EXPECT_EQ(cache.size(), 1u);
  }
  cache.clear();
  EXPECT_EQ(cache.size(), 0u);
  w.reset();
  EXPECT_EQ(source.wait_exit(), 0);
}

}  // namespace
}  // namespace sockshare
