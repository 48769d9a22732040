#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "sockshare/channel.hpp"
#include "sockshare/socket.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

class Endpoints : public test::FdLeakTest {
protected:
  void SetUp() override {
    test::FdLeakTest::SetUp();
    ASSERT_NE(::mkdtemp(dir_), nullptr);
  }
  void TearDown() override {
    ::unlink(path("s").c_str());
    ::rmdir(dir_);
    test::FdLeakTest::TearDown();
  }
  [[nodiscard]] std::string path(const char* name) const { return std::string(dir_) + "/" + name; }

private:
  char dir_[32] = "/tmp/sockshare-ep-XXXXXX";
};

TEST_F(Endpoints, ParsesEveryForm) {
  EXPECT_EQ(parse_endpoint("127.0.0.1:8080").to_string(), "127.0.0.1:8080");
  EXPECT_EQ(parse_endpoint("[::1]:8081").kind, Endpoint::Kind::inet6);
  EXPECT_EQ(parse_endpoint(":80").host, "");
  EXPECT_EQ(parse_endpoint("unix:@name").kind, Endpoint::Kind::unix_abstract);
  EXPECT_EQ(parse_endpoint("unix:/run/x.sock").path, "/run/x.sock");
  for (const char* bad : {"8080", "1.2.3.4:", "1.2.3.4:65536", "::1:80", "[::1]80", "unix:",
                          "host.example:80", "[zz]:1"}) {
    try {
      (void)parse_endpoint(bad);
      ADD_FAILURE() << bad << " parsed";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_input) << bad;
    }
  }
}

TEST_F(Endpoints, DeferredAcceptHoldsASilentConnectionBackFromAccept) {
  Fd plain = listen_on(parse_endpoint("127.0.0.1:0"));
  EXPECT_EQ(defer_accept_of(plain.borrow()).count(), 0);
  Fd deferred = listen_on(parse_endpoint("127.0.0.1:0"), {.defer_accept = std::chrono::seconds{30}});
  EXPECT_GE(defer_accept_of(deferred.borrow()).count(), 30);  // rounded up by the kernel
  Fd v6 = listen_on(parse_endpoint("[::1]:0"), {.defer_accept = std::chrono::seconds{1}});
  EXPECT_EQ(defer_accept_of(v6.borrow()).count(), 1);
  // A unix listener has no such option: it is not set, and reads back as off.
  Fd local = listen_on(parse_endpoint("unix:" + path("s")), {.defer_accept = std::chrono::seconds{1}});
  EXPECT_EQ(defer_accept_of(local.borrow()).count(), 0);

  // The point of it: a connected client that has sent nothing is not accept()ed; one byte
  // makes it so.
  Fd client = connect_to(local_endpoint(deferred.borrow()));
  ASSERT_TRUE(client.valid());
  pollfd p{deferred.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 200), 0) << "a silent connection was queued for accept";
  ASSERT_EQ(::send(client.get(), "x", 1, MSG_NOSIGNAL), 1);
  EXPECT_EQ(::poll(&p, 1, 5000), 1);
  Fd accepted(::accept4(deferred.get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(accepted.valid());
  char byte = 0;
  EXPECT_EQ(::recv(accepted.get(), &byte, 1, MSG_DONTWAIT), 1);
}

TEST_F(Endpoints, StaleUnixSocketFileIsReplaced) {
  const Endpoint ep = parse_endpoint("unix:" + path("s"));
  { Fd dead = listen_on(ep); }  // closed: the file stays, nobody listens behind it
  ASSERT_EQ(::access(path("s").c_str(), F_OK), 0);
  Fd fresh = listen_on(ep);
  Fd client = connect_to(ep);
  EXPECT_TRUE(client.valid());
}

TEST_F(Endpoints, LiveUnixSocketIsKeptEvenWithAFullBacklog) {
  const Endpoint ep = parse_endpoint("unix:" + path("s"));
  Fd live = listen_on(ep, {.backlog = 0});
  // Fill the backlog so a blocking probe would hang.
  std::vector<Fd> queued;
  for (int i = 0; i < 4; ++i) {
    Fd c(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::strncpy(sun.sun_path, ep.path.c_str(), sizeof sun.sun_path - 1);
    ::connect(c.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun);
    queued.push_back(std::move(c));
  }
  try {
    (void)listen_on(ep);
    FAIL() << "a live server's socket file was taken over";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), EADDRINUSE);
  }
}

TEST_F(Endpoints, ChannelConnectTimesOutOnAFullBacklog) {
  const Endpoint ep = parse_endpoint("unix:" + path("s"));
  auto listener = ChannelListener::listen(ep, 0);
  std::vector<Channel> queued;
  try {
    for (int i = 0; i < 8; ++i) queued.push_back(Channel::connect(ep, std::chrono::milliseconds(50)));
    FAIL() << "8 connections fit a backlog of 0";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::timed_out) << e.what();
  }
  // Room again once the listener accepts.
  while (listener.try_accept()) {
  }
  Channel late = Channel::connect(ep, std::chrono::seconds(5));
  EXPECT_TRUE(late.valid());
}

TEST_F(Endpoints, ChannelListenerFileHasExactlyTheModeAsked) {
  auto listener = ChannelListener::listen(parse_endpoint("unix:" + path("s")), 16, 0660);
  struct stat st {};
  ASSERT_EQ(::stat(path("s").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

}  // namespace
}  // namespace sockshare
