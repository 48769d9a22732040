#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "sockshare/channel.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using test::FdLeakTest;

std::span<const std::byte> bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

class ChannelBasic : public FdLeakTest {};

TEST_F(ChannelBasic, PayloadAndDescriptorsArriveTogether) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  const auto seq = a.send({.type = 7, .payload = bytes("hello"), .fds = fds});
  Message m = b.receive({}, std::chrono::seconds(5));
  EXPECT_EQ(m.type, 7);
  EXPECT_EQ(m.seq, seq);
  EXPECT_EQ(m.payload_text(), "hello");
  ASSERT_EQ(m.fds.size(), 1u);
  EXPECT_TRUE(m.fd_meta.empty());
  // Same open file: writing through the received copy reaches the pipe.
  w.reset();
  ASSERT_EQ(::write(m.fds[0].get(), "x", 1), 1);
  char c = 0;
  EXPECT_EQ(::read(r.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');
}

TEST_F(ChannelBasic, ArrivalTimeIsWhenTheMessageWasQueuedNotWhenItWasRead) {
  using std::chrono::system_clock;  // CLOCK_REALTIME, the kernel's stamp
  auto realtime_ns = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(system_clock::now().time_since_epoch()).count();
  };
  auto [a, b] = Channel::pair();
  b.record_arrival_times();
  const std::int64_t before = realtime_ns();
  a.send({.type = 7, .payload = bytes("late")});
  const std::int64_t after = realtime_ns();
  // The late read is what this test is about, not a wait for readiness.
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  Message m = b.receive({}, std::chrono::seconds(5));
  const std::int64_t read_at = realtime_ns();
  constexpr std::int64_t kSlackNs = 5'000'000;  // a clock adjustment in between
  EXPECT_GE(m.queued_realtime_ns, before - kSlackNs);
  EXPECT_LE(m.queued_realtime_ns, after + kSlackNs);
  EXPECT_GE(read_at - m.queued_realtime_ns, 30'000'000);
  // Only the end that asked gets stamps.
  b.send({.type = 8});
  EXPECT_EQ(a.receive({}, std::chrono::seconds(5)).queued_realtime_ns, 0);
}

TEST_F(ChannelBasic, PerDescriptorMetadata) {
  auto [a, b] = Channel::pair();
  auto [r1, w1] = test::make_pipe();
  auto [r2, w2] = test::make_pipe();
  BorrowedFd fds[] = {r1.borrow(), r2.borrow()};
  std::span<const std::byte> meta[] = {bytes("first"), bytes("")};
  a.send({.type = 1, .fds = fds, .fd_meta = meta});
  Message m = b.receive({}, std::chrono::seconds(5));
  ASSERT_EQ(m.fds.size(), 2u);
  ASSERT_EQ(m.fd_meta.size(), 2u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(m.fd_meta[0].data()), m.fd_meta[0].size()),
            "first");
  EXPECT_TRUE(m.fd_meta[1].empty());
}

TEST_F(ChannelBasic, ReceiveTimesOutWhenNothingArrives) {
  auto [a, b] = Channel::pair();
  try {
    (void)b.receive({}, std::chrono::milliseconds(20));
    FAIL() << "expected a timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::timed_out);
  }
  EXPECT_FALSE(b.try_receive().has_value());
}

TEST_F(ChannelBasic, EndOfStreamIsPeerGone) {
  auto [a, b] = Channel::pair();
  { Channel closing = std::move(a); }
  try {
    (void)b.receive({}, std::chrono::seconds(5));
    FAIL() << "expected peer_gone";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::peer_gone);
  }
}

TEST_F(ChannelBasic, ListenerAndConnectOverAbstractName) {
  const std::string name = "sockshare-test-" + std::to_string(::getpid());
  auto listener = ChannelListener::listen(parse_endpoint("unix:@" + name));
  Channel client = Channel::connect(parse_endpoint("unix:@" + name), std::chrono::seconds(5));
  Channel server = listener.accept(std::chrono::seconds(5));
  client.send({.type = 3, .payload = bytes("ping")});
  EXPECT_EQ(server.receive({}, std::chrono::seconds(5)).payload_text(), "ping");
  EXPECT_EQ(server.peer_credentials().pid, ::getpid());
}

TEST_F(ChannelBasic, ListenerOnPathIsOwnerOnlyAndRemovedAfter) {
  char dir[] = "/tmp/sockshare-test-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/ch.sock";
  {
    auto listener = ChannelListener::listen(parse_endpoint("unix:" + path));
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
  ::rmdir(dir);
}

TEST(ChannelErrors, MessagesNameOperationAndErrno) {
  Error e = Error::from_errno("sendmsg(fd 7, 3 fds)", EPIPE);
  EXPECT_EQ(e.kind(), ErrorKind::peer_gone);
  EXPECT_EQ(e.code(), EPIPE);
  EXPECT_NE(std::string(e.what()).find("sendmsg(fd 7, 3 fds): EPIPE"), std::string::npos);
  EXPECT_EQ(kind_from_errno(ETOOMANYREFS), ErrorKind::overloaded);
  EXPECT_EQ(kind_from_errno(EMFILE), ErrorKind::overloaded);
}

}  // namespace
}  // namespace sockshare
