// The kernel traps of docs RELIABILITY.md R1-R16 that one process can provoke on its own:
// each test builds the bad situation for real (raw sendmsg from a "hostile" peer, the OS
// seam for what only a full system produces) and proves the channel reports it, closes
// every descriptor that arrived and leaves the channel usable.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/wire.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::FdLeakTest;

std::span<const std::byte> bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// Everything a test wants to know about a failure, caught from any call.
struct Caught {
  bool thrown = false;
  bool channel_error = false;
  ErrorKind kind = ErrorKind::system;
  int code = 0;
  std::string what;
  std::uint64_t seq = 0;
  std::uint16_t type = 0;
};

template <class F>
Caught catch_error(F&& f) {
  Caught c;
  try {
    f();
  } catch (const ChannelError& e) {
    c = {true, true, e.kind(), e.code(), e.what(), e.message_seq(), e.message_type()};
  } catch (const Error& e) {
    c = {true, false, e.kind(), e.code(), e.what(), 0, 0};
  }
  return c;
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

struct Pipes {
  std::vector<Fd> read;
  std::vector<Fd> write;
  [[nodiscard]] std::vector<int> write_ints() const {
    std::vector<int> out;
    for (auto& w : write) out.push_back(w.get());
    return out;
  }
  [[nodiscard]] std::vector<BorrowedFd> write_borrowed() const {
    std::vector<BorrowedFd> out;
    for (auto& w : write) out.push_back(w.borrow());
    return out;
  }
};

Pipes make_pipes(std::size_t n, bool cloexec = true) {
  Pipes p;
  for (std::size_t i = 0; i < n; ++i) {
    auto [r, w] = test::make_pipe(cloexec);
    p.read.push_back(std::move(r));
    p.write.push_back(std::move(w));
  }
  return p;
}

// KJ's proof that nothing kept a descriptor: once this process has dropped its write ends,
// a read end reports end-of-file only if no copy survives anywhere, neither in flight nor
// in the receiver nor in the kernel's truncation path.
void expect_every_read_end_at_eof(const std::vector<Fd>& read_ends) {
  for (std::size_t i = 0; i < read_ends.size(); ++i) {
    pollfd p{read_ends[i].get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 5000), 1) << "read end " << i << " never saw EOF";
    char c = 0;
    EXPECT_EQ(::read(read_ends[i].get(), &c, 1), 0) << "read end " << i << " is not at EOF";
  }
}

// A message as a broken or hostile peer would build it: a valid header announcing
// `fd_count` descriptors and `payload_len` payload bytes.
std::vector<std::byte> raw_message(std::uint8_t fd_count, std::size_t payload_len,
                                   std::uint64_t seq = 1) {
  std::vector<std::byte> m(wire::kHeaderSize + payload_len, std::byte{'p'});
  wire::Header h;
  h.type = 0x42;
  h.fd_count = fd_count;
  h.seq = seq;
  h.payload_len = static_cast<std::uint32_t>(payload_len);
  wire::encode_header(h, std::span<std::byte, wire::kHeaderSize>(m.data(), wire::kHeaderSize));
  return m;
}

// Sends bytes and descriptors exactly as given, one SCM_RIGHTS control message per group,
// bypassing every check of the channel. Returns sendmsg's result (errno on -1).
ssize_t raw_send(const Channel& ch, std::span<const std::byte> data,
                 const std::vector<std::vector<int>>& groups) {
  std::size_t space = 0;
  for (const auto& g : groups) space += CMSG_SPACE(sizeof(int) * g.size());
  std::vector<cmsghdr> control(space / sizeof(cmsghdr) + 1);
  iovec iov{const_cast<std::byte*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (space > 0) {
    msg.msg_control = control.data();
    msg.msg_controllen = space;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    for (const auto& g : groups) {
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * g.size());
      std::memcpy(CMSG_DATA(c), g.data(), sizeof(int) * g.size());
      c = CMSG_NXTHDR(&msg, c);
    }
  }
  return ::sendmsg(ch.native_handle().get(), &msg, MSG_NOSIGNAL);
}

bool has_cloexec(int fd) {
  return (::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
}

// A channel still works after a failure: the next message arrives intact.
void expect_channel_still_works(Channel& from, Channel& to) {
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  const auto seq = from.send({.type = 5, .payload = bytes("after"), .fds = fds}, seconds(5));
  Message m = to.receive({}, seconds(5));
  EXPECT_EQ(m.seq, seq);
  EXPECT_EQ(m.payload_text(), "after");
  EXPECT_EQ(m.fds.size(), 1u);
}

// ---- OS seam instruments. Plain functions: the seam holds function pointers. ----

std::atomic<std::size_t> g_control_limit{0};
ssize_t recvmsg_with_small_control(int fd, msghdr* msg, int flags) {
  // What a careless receiver does: too small a control buffer, or none at all.
  const std::size_t limit = g_control_limit.load();
  if (limit == 0) {
    msg->msg_control = nullptr;
    msg->msg_controllen = 0;
  } else if (msg->msg_controllen > limit) {
    msg->msg_controllen = limit;
  }
  return ::recvmsg(fd, msg, flags);
}

std::atomic<int> g_send_calls{0};
std::atomic<int> g_send_flags_union{0};
std::atomic<int> g_send_flags_intersection{~0};
ssize_t counting_sendmsg(int fd, const msghdr* msg, int flags) {
  ++g_send_calls;
  g_send_flags_union |= flags;
  g_send_flags_intersection &= flags;
  return ::sendmsg(fd, msg, flags);
}
void reset_send_counters() {
  g_send_calls = 0;
  g_send_flags_union = 0;
  g_send_flags_intersection = ~0;
}

std::atomic<int> g_recv_calls{0};
std::atomic<int> g_recv_flags_union{0};
std::atomic<int> g_recv_flags_intersection{~0};
ssize_t counting_recvmsg(int fd, msghdr* msg, int flags) {
  ++g_recv_calls;
  g_recv_flags_union |= flags;
  g_recv_flags_intersection &= flags;
  return ::recvmsg(fd, msg, flags);
}

std::atomic<int> g_inject_errno{0};
std::atomic<int> g_inject_count{0};
ssize_t failing_sendmsg(int fd, const msghdr* msg, int flags) {
  ++g_send_calls;
  if (g_inject_count > 0) {
    --g_inject_count;
    errno = g_inject_errno;
    return -1;
  }
  return ::sendmsg(fd, msg, flags);
}
ssize_t failing_recvmsg(int fd, msghdr* msg, int flags) {
  ++g_recv_calls;
  if (g_inject_count > 0) {
    --g_inject_count;
    errno = g_inject_errno;
    return -1;
  }
  return ::recvmsg(fd, msg, flags);
}
std::atomic<int> g_accept_calls{0};
int failing_accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  ++g_accept_calls;
  if (g_inject_count > 0) {
    --g_inject_count;
    errno = g_inject_errno;
    return -1;
  }
  return ::accept4(fd, addr, len, flags);
}
void inject(int err, int count) {
  g_inject_errno = err;
  g_inject_count = count;
  g_send_calls = 0;
  g_recv_calls = 0;
  g_accept_calls = 0;
}

class ChannelTraps : public FdLeakTest {};

// ---- R1 ----

TEST_F(ChannelTraps, R1_TruncatedControlBufferIsProtocolErrorAndClosesEverything) {
  for (std::size_t limit : {std::size_t{CMSG_SPACE(sizeof(int))}, std::size_t{0}}) {
    SCOPED_TRACE("control buffer of " + std::to_string(limit) + " bytes");
    auto [a, b] = Channel::pair();
    Pipes pipes = make_pipes(5);
    auto fds = pipes.write_borrowed();
    const auto seq = a.send({.type = 9, .fds = fds}, seconds(5));
    pipes.write.clear();  // the only copies left are in flight
    const auto before = test::open_fds();
    Caught c;
    {
      sys::SeamGuard guard;
      g_control_limit = limit;
      sys::seam().recvmsg = recvmsg_with_small_control;
      c = catch_error([&] { (void)b.receive({}, seconds(5)); });
    }
    ASSERT_TRUE(c.channel_error) << c.what;
    EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
    EXPECT_TRUE(contains(c.what, "MSG_CTRUNC")) << c.what;
    EXPECT_EQ(c.seq, seq);
    EXPECT_EQ(c.type, 9);
    // Exactly the descriptors open before: what arrived was closed, nothing extra.
    EXPECT_EQ(test::open_fds(), before);
    // The kernel closed what did not fit; the channel closed what did.
    expect_every_read_end_at_eof(pipes.read);
    expect_channel_still_works(a, b);
  }
}

// ---- R2 ----

TEST_F(ChannelTraps, R2_MoreDescriptorsThanAnnouncedInOneControlMessage) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(2);
  // CMSG_SPACE(sizeof(int)) holds two descriptors on x86-64: the header says 1, 2 arrive.
  auto m = raw_message(1, 3);
  ASSERT_EQ(raw_send(a, m, {pipes.write_ints()}), static_cast<ssize_t>(m.size()));
  pipes.write.clear();
  const auto before = test::open_fds();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "announces 1 descriptors but 2 arrived")) << c.what;
  EXPECT_EQ(test::open_fds(), before);
  expect_every_read_end_at_eof(pipes.read);
  expect_channel_still_works(a, b);
}

TEST_F(ChannelTraps, R2_TwoRightsMessagesArriveMergedAndAreCountedTogether) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(2);
  auto m = raw_message(1, 0);
  ASSERT_EQ(raw_send(a, m, {{pipes.write[0].get()}, {pipes.write[1].get()}}),
            static_cast<ssize_t>(m.size()));
  pipes.write.clear();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "but 2 arrived")) << c.what;
  expect_every_read_end_at_eof(pipes.read);
}

TEST_F(ChannelTraps, R2_FewerDescriptorsThanAnnounced) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(1);
  auto m = raw_message(3, 0);
  ASSERT_EQ(raw_send(a, m, {pipes.write_ints()}), static_cast<ssize_t>(m.size()));
  pipes.write.clear();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "announces 3 descriptors but 1 arrived")) << c.what;
  expect_every_read_end_at_eof(pipes.read);
}

TEST_F(ChannelTraps, R2_KernelMergesSeparateRightsMessagesIntoOne) {
  // Why the count must come from cmsg_len: the receiver cannot see how the sender split
  // its descriptors. Two control messages with 1 + 1 descriptors match a header of 2.
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(2);
  auto m = raw_message(2, 0);
  ASSERT_EQ(raw_send(a, m, {{pipes.write[0].get()}, {pipes.write[1].get()}}),
            static_cast<ssize_t>(m.size()));
  Message got = b.receive({}, seconds(5));
  EXPECT_EQ(got.fds.size(), 2u);
}

// ---- R3 ----

TEST_F(ChannelTraps, R3_ChannelRefusesStreamDatagramAndNonSockets) {
  for (int type : {SOCK_STREAM, SOCK_DGRAM}) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv), 0);
    Fd keep(sv[1]);
    Caught c = catch_error([&] { Channel ch{Fd(sv[0])}; });
    EXPECT_EQ(c.kind, ErrorKind::invalid_input) << c.what;
    EXPECT_TRUE(contains(c.what, "SOCK_SEQPACKET")) << c.what;
  }
  auto [r, w] = test::make_pipe();
  Caught c = catch_error([&] { Channel ch{std::move(r)}; });
  EXPECT_EQ(c.kind, ErrorKind::invalid_input) << c.what;
  // The refused descriptors were closed by the constructor (checked by the fixture); a
  // SEQPACKET pair is accepted.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  Channel x{Fd(sv[0])};
  Channel y{Fd(sv[1])};
  expect_channel_still_works(x, y);
}

// ---- R4 ----

TEST_F(ChannelTraps, R4_ZeroLengthMessageWithDescriptorIsRejected) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(1);
  ASSERT_EQ(raw_send(a, {}, {pipes.write_ints()}), 0);
  pipes.write.clear();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "zero-length message carrying descriptors")) << c.what;
  expect_every_read_end_at_eof(pipes.read);
  expect_channel_still_works(a, b);
}

TEST_F(ChannelTraps, R4_ZeroLengthMessageIsNotMistakenForEndOfStream) {
  auto [a, b] = Channel::pair();
  ASSERT_EQ(raw_send(a, {}, {}), 0);
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  expect_channel_still_works(a, b);
  // The real end of stream still reads as peer_gone.
  a.shutdown_send();
  EXPECT_EQ(catch_error([&] { (void)b.receive({}, seconds(5)); }).kind, ErrorKind::peer_gone);
}

TEST_F(ChannelTraps, R4_EmptyPayloadTravelsBecauseTheHeaderIsAlwaysThere) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(1);
  auto fds = pipes.write_borrowed();
  a.send({.type = 1}, seconds(5));
  a.send({.type = 2, .fds = fds}, seconds(5));
  Message m = b.receive({}, seconds(5));
  EXPECT_EQ(m.type, 1);
  EXPECT_TRUE(m.payload.empty());
  m = b.receive({}, seconds(5));
  EXPECT_EQ(m.type, 2);
  EXPECT_TRUE(m.payload.empty());
  EXPECT_EQ(m.fds.size(), 1u);
}

// ---- R5 ----

TEST_F(ChannelTraps, R5_OversizedMessageIsTruncatedRejectedAndItsDescriptorsClosed) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(3);
  auto m = raw_message(3, wire::kMaxMessage + 100 - wire::kHeaderSize);
  ASSERT_EQ(raw_send(a, m, {pipes.write_ints()}), static_cast<ssize_t>(m.size()));
  pipes.write.clear();
  const auto before = test::open_fds();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "truncated")) << c.what;
  EXPECT_EQ(test::open_fds(), before);
  expect_every_read_end_at_eof(pipes.read);
  expect_channel_still_works(a, b);
}

TEST_F(ChannelTraps, R5_LargestMessageFitsAndOneByteMoreIsRefusedBeforeSending) {
  auto [a, b] = Channel::pair();
  std::vector<std::byte> payload(wire::kMaxPayload, std::byte{7});
  a.send({.payload = payload}, seconds(5));
  Message m = b.receive({}, seconds(5));
  EXPECT_EQ(m.payload, payload);
  payload.push_back(std::byte{8});
  Caught c = catch_error([&] { a.send({.payload = payload}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::invalid_input) << c.what;
}

// ---- R6 ----

TEST_F(ChannelTraps, R6_ReceiveNeverPeeksAndInstallsExactlyWhatArrived) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(3);
  auto fds = pipes.write_borrowed();
  sys::SeamGuard guard;
  g_recv_calls = 0;
  g_recv_flags_union = 0;
  g_recv_flags_intersection = ~0;
  sys::seam().recvmsg = counting_recvmsg;

  const auto before = test::open_fds();
  a.send({.fds = fds}, seconds(5));
  Message m = b.receive({}, seconds(5));
  ASSERT_EQ(m.fds.size(), 3u);
  std::set<int> expected = before;
  for (auto& fd : m.fds) expected.insert(fd.get());
  EXPECT_EQ(test::open_fds(), expected) << "a receive installed more than it returned";

  // A failed receive (one descriptor too many) leaves exactly what was open before.
  m = Message{};
  auto bad = raw_message(1, 0);
  ASSERT_EQ(raw_send(a, bad, {pipes.write_ints()}), static_cast<ssize_t>(bad.size()));
  EXPECT_EQ(catch_error([&] { b.receive(m, {}, seconds(5)); }).kind, ErrorKind::protocol);
  EXPECT_EQ(test::open_fds(), before);

  EXPECT_GE(g_recv_calls.load(), 2);
  EXPECT_EQ(g_recv_flags_union.load() & MSG_PEEK, 0);
  EXPECT_EQ(g_recv_flags_intersection.load() & MSG_CMSG_CLOEXEC, MSG_CMSG_CLOEXEC);
}

// ---- R7 ----

TEST_F(ChannelTraps, R7_EveryReceivedDescriptorIsCloseOnExec) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(4, /*cloexec=*/false);
  Fd udp(::socket(AF_INET, SOCK_DGRAM, 0));  // deliberately inheritable
  ASSERT_TRUE(udp.valid());
  auto fds = pipes.write_borrowed();
  fds.push_back(udp.borrow());
  for (auto fd : fds) ASSERT_FALSE(has_cloexec(fd.get())) << "the control must be inheritable";
  a.send({.fds = fds}, seconds(5));
  Message m = b.receive({}, seconds(5));
  ASSERT_EQ(m.fds.size(), fds.size());
  for (auto& fd : m.fds) EXPECT_TRUE(has_cloexec(fd.get())) << "fd " << fd.get();
}

// ---- R8 ----

// One pipe 253 times from `a` to `b`: the kernel installs 253 distinct descriptors for it, all
// close-on-exec, and none outlives the Message.
void expect_full_batch_arrives(Channel& a, Channel& b, bool stamped) {
  auto [r, w] = test::make_pipe();
  std::vector<BorrowedFd> fds(wire::kMaxFds, w.borrow());
  a.send({.fds = fds}, seconds(5));
  w.reset();
  {
    Message m = b.receive({}, seconds(5));
    ASSERT_EQ(m.fds.size(), wire::kMaxFds);
    std::set<int> distinct;
    for (auto& fd : m.fds) {
      distinct.insert(fd.get());
      EXPECT_TRUE(has_cloexec(fd.get()));
    }
    EXPECT_EQ(distinct.size(), wire::kMaxFds);
    EXPECT_EQ(m.queued_realtime_ns != 0, stamped);
  }
  pollfd p{r.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  char c = 0;
  EXPECT_EQ(::read(r.get(), &c, 1), 0) << "a received copy outlived its Message";
}

TEST_F(ChannelTraps, R8_253DescriptorsTravelInOneMessage) {
  auto [a, b] = Channel::pair();
  expect_full_batch_arrives(a, b, false);
}

TEST_F(ChannelTraps, R8_253DescriptorsAndAnArrivalTimeFitOneControlBuffer) {
  // The timestamp's control message comes on top of a full batch and of every credential
  // message a socket can be set to receive: too small a buffer would truncate, and the kernel
  // would close descriptors in transit (R1).
  auto [a, b] = Channel::pair();
  b.record_arrival_times();
  const int on = 1;
  ASSERT_EQ(::setsockopt(b.native_handle().get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on), 0);
  // Linux 6.5+; without it the case is one message smaller, and still checked.
  (void)::setsockopt(b.native_handle().get(), SOL_SOCKET, SO_PASSPIDFD, &on, sizeof on);
  expect_full_batch_arrives(a, b, true);
}

TEST_F(ChannelTraps, R8_254DescriptorsAreRefusedBeforeAnySyscall) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  std::vector<BorrowedFd> fds(wire::kMaxFds + 1, w.borrow());
  sys::SeamGuard guard;
  reset_send_counters();
  sys::seam().sendmsg = counting_sendmsg;
  Caught c = catch_error([&] { (void)a.try_send({.fds = fds}); });
  EXPECT_EQ(c.kind, ErrorKind::invalid_input) << c.what;
  EXPECT_TRUE(contains(c.what, "254 descriptors")) << c.what;
  EXPECT_EQ(g_send_calls.load(), 0);
  EXPECT_FALSE(b.try_receive().has_value());
}

TEST_F(ChannelTraps, R8_KernelLimitIsWhatTheWireFormatAssumes) {
  // If a kernel ever raises SCM_MAX_FD this test says so; kMaxFds is the portable limit.
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  auto m = raw_message(0, 0);
  std::vector<int> many(wire::kMaxFds + 1, w.get());
  errno = 0;
  EXPECT_EQ(raw_send(a, m, {many}), -1);
  EXPECT_EQ(errno, EINVAL);
  many.pop_back();
  EXPECT_EQ(raw_send(a, m, {many}), static_cast<ssize_t>(m.size()));
  // The header said 0: the receiver rejects and closes all 253.
  w.reset();
  Caught c = catch_error([&] { (void)b.receive({}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  std::vector<Fd> read_end;
  read_end.push_back(std::move(r));
  expect_every_read_end_at_eof(read_end);
}

// ---- R10 ----

TEST_F(ChannelTraps, R10_PeerThatNeverReadsGivesBackPressureNotAWedge) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  const auto started = std::chrono::steady_clock::now();
  std::uint64_t sent = 0;
  bool stopped = false;
  Caught c;
  // Bounded: the default SEQPACKET buffers take a few hundred small messages.
  for (int i = 0; i < 100000 && !stopped; ++i) {
    c = catch_error([&] {
      if (auto seq = a.try_send({.payload = bytes("x"), .fds = fds})) {
        EXPECT_EQ(*seq, sent + 1);
        ++sent;
      } else {
        stopped = true;
      }
    });
    if (c.thrown) stopped = true;
  }
  ASSERT_TRUE(stopped) << "100000 unread messages were all accepted";
  if (c.thrown) {
    // Non-root senders hit the per-user in-flight limit first.
    EXPECT_EQ(c.kind, ErrorKind::overloaded) << c.what;
    EXPECT_EQ(c.code, ETOOMANYREFS) << c.what;
  }
  EXPECT_GT(sent, 0u);
  // A blocking send gives up at its deadline instead of hanging.
  Caught t = catch_error([&] { a.send({.payload = bytes("x"), .fds = fds}, milliseconds(50)); });
  if (!c.thrown) {
    EXPECT_EQ(t.kind, ErrorKind::timed_out) << t.what;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - started, seconds(10));

  // Once the peer reads, sending resumes and no sequence number was spent on a refusal.
  Message m;
  for (std::uint64_t i = 1; i <= sent; ++i) {
    b.receive(m, {}, seconds(5));
    ASSERT_EQ(m.seq, i);
  }
  EXPECT_EQ(a.send({.payload = bytes("y")}, seconds(5)), sent + 1);
}

TEST_F(ChannelTraps, R10_InFlightLimitErrorsAreOverloaded) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  sys::SeamGuard guard;
  sys::seam().sendmsg = failing_sendmsg;
  for (int err : {ETOOMANYREFS, ENOBUFS, ENOMEM}) {
    SCOPED_TRACE(errno_name(err));
    inject(err, 1);
    Caught c = catch_error([&] { (void)a.try_send({.fds = fds}); });
    EXPECT_EQ(c.kind, ErrorKind::overloaded) << c.what;
    EXPECT_EQ(c.code, err);
    EXPECT_TRUE(contains(c.what, "1 fds")) << c.what;
    // Blocking send does not retry an overload: the caller decides what to shed.
    inject(err, 1);
    EXPECT_EQ(catch_error([&] { a.send({.fds = fds}, seconds(5)); }).kind, ErrorKind::overloaded);
    EXPECT_EQ(g_send_calls.load(), 1);
  }
  // EAGAIN is not an error: nothing was sent and no number was used.
  inject(EAGAIN, 1);
  EXPECT_FALSE(a.try_send({.fds = fds}).has_value());
  EXPECT_EQ(a.try_send({.fds = fds}), std::optional<std::uint64_t>(1));
  EXPECT_EQ(b.receive({}, seconds(5)).seq, 1u);
}

// ---- R11 ----

TEST_F(ChannelTraps, R11_UnixSocketDescriptorsAreRefusedUnlessAllowed) {
  auto [a, b] = Channel::pair();
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd mine(sv[0]);
  Fd sent(sv[1]);
  BorrowedFd fds[] = {sent.borrow()};
  for (int i = 0; i < 3; ++i) a.send({.fds = fds}, seconds(5));
  sent.reset();

  for (Expect expect : {Expect::anything, Expect::stream}) {
    SCOPED_TRACE(std::string(to_string(expect)));
    Caught c = catch_error([&] { (void)b.receive({.expect = expect}, seconds(5)); });
    EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
    EXPECT_TRUE(contains(c.what, "unix socket descriptors are not allowed")) << c.what;
  }
  {
    Message m = b.receive({.expect = Expect::stream, .allow_unix_sockets = true}, seconds(5));
    ASSERT_EQ(m.fds.size(), 1u);
    ASSERT_EQ(::write(m.fds[0].get(), "u", 1), 1);
    char c = 0;
    ASSERT_EQ(::read(mine.get(), &c, 1), 1);
    EXPECT_EQ(c, 'u');
  }
  // The accepted copy is gone now; EOF proves the two refused copies were closed too.
  pollfd p{mine.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  char c = 0;
  EXPECT_EQ(::read(mine.get(), &c, 1), 0);
}

// ---- R13 ----

TEST_F(ChannelTraps, R13_SendingToAClosedPeerIsPeerGoneWithoutSigpipe) {
  struct sigaction current {};
  ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &current), 0);
  // A kernel that raised SIGPIPE here would kill this process, not pass the test. Linux
  // 6.18 only raises it on STREAM sockets, so the flag check below is what fails today.
  ASSERT_EQ(current.sa_handler, SIG_DFL) << "SIGPIPE must keep its default action here";

  sys::SeamGuard guard;
  reset_send_counters();
  sys::seam().sendmsg = counting_sendmsg;
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  {
    // Peer closed with our message unread: ECONNRESET first, then EPIPE.
    auto [a, b] = Channel::pair();
    a.send({.payload = bytes("unread"), .fds = fds}, seconds(5));
    { Channel gone = std::move(b); }
    Caught first = catch_error([&] { (void)a.try_send({.fds = fds}); });
    EXPECT_EQ(first.kind, ErrorKind::peer_gone) << first.what;
    EXPECT_TRUE(first.code == ECONNRESET || first.code == EPIPE) << first.what;
    Caught second = catch_error([&] { a.send({.payload = bytes("again")}, seconds(5)); });
    EXPECT_EQ(second.kind, ErrorKind::peer_gone) << second.what;
    EXPECT_EQ(second.code, EPIPE) << second.what;
  }
  {
    // Peer closed cleanly.
    auto [a, b] = Channel::pair();
    { Channel gone = std::move(b); }
    Caught c = catch_error([&] { a.send({.fds = fds}, seconds(5)); });
    EXPECT_EQ(c.kind, ErrorKind::peer_gone) << c.what;
    EXPECT_EQ(c.code, EPIPE) << c.what;
  }
  EXPECT_GE(g_send_calls.load(), 4);
  EXPECT_EQ(g_send_flags_intersection.load() & MSG_NOSIGNAL, MSG_NOSIGNAL);
}

// ---- R14 ----

TEST_F(ChannelTraps, R14_StatusFlagsAreSharedDescriptorFlagsAreNot) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe(/*cloexec=*/false);
  BorrowedFd fds[] = {r.borrow()};
  a.send({.fds = fds}, seconds(5));
  Message m = b.receive({}, seconds(5));
  ASSERT_EQ(m.fds.size(), 1u);
  const int received = m.fds[0].get();
  ASSERT_EQ(::fcntl(r.get(), F_GETFL) & O_NONBLOCK, 0);

  // O_NONBLOCK lives on the open file description: the receiver's change reaches us.
  set_nonblocking(m.fds[0].borrow(), true);
  EXPECT_NE(::fcntl(r.get(), F_GETFL) & O_NONBLOCK, 0);
  char c = 0;
  errno = 0;
  EXPECT_EQ(::read(r.get(), &c, 1), -1);
  EXPECT_EQ(errno, EAGAIN) << "our copy became non-blocking behind our back";
  set_nonblocking(r.borrow(), false);
  EXPECT_EQ(::fcntl(received, F_GETFL) & O_NONBLOCK, 0);

  // FD_CLOEXEC is per descriptor: each copy keeps its own.
  EXPECT_FALSE(has_cloexec(r.get()));
  EXPECT_TRUE(has_cloexec(received));
  ASSERT_EQ(::fcntl(received, F_SETFD, 0), 0);
  ASSERT_EQ(::fcntl(r.get(), F_SETFD, FD_CLOEXEC), 0);
  EXPECT_FALSE(has_cloexec(received));
  EXPECT_TRUE(has_cloexec(r.get()));
}

// ---- R15 ----

struct Objects {
  Fd tcp_listener, tcp_client, tcp_server, udp, unix_a, unix_b, unix_listener, pipe_r, pipe_w, file;
};

Objects make_objects() {
  Objects o;
  o.tcp_listener = listen_on(parse_endpoint("127.0.0.1:0"));
  o.tcp_client = connect_to(local_endpoint(o.tcp_listener.borrow()));
  o.tcp_server = Fd(::accept4(o.tcp_listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  o.udp = Fd(::socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0) {
    o.unix_a = Fd(sv[0]);
    o.unix_b = Fd(sv[1]);
  }
  o.unix_listener = Fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  // Autobind (address length = sizeof(sa_family_t)) picks a free abstract name.
  if (::bind(o.unix_listener.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sa_family_t)) != 0 ||
      ::listen(o.unix_listener.get(), 4) != 0) {
    o.unix_listener.reset();
  }
  auto [r, w] = test::make_pipe();
  o.pipe_r = std::move(r);
  o.pipe_w = std::move(w);
  o.file = Fd(::memfd_create("sockshare-r15", MFD_CLOEXEC));
  return o;
}

TEST_F(ChannelTraps, R15_WrongObjectIsRefusedNamedAndClosed) {
  Objects o = make_objects();
  for (Fd* fd : {&o.tcp_listener, &o.tcp_client, &o.tcp_server, &o.udp, &o.unix_a, &o.unix_listener,
                 &o.pipe_r, &o.file}) {
    ASSERT_TRUE(fd->valid());
  }
  struct Case {
    const Fd* fd;
    std::string_view named;
  };
  const Case wrong[] = {{&o.pipe_w, "pipe"},
                        {&o.file, "regular file"},
                        {&o.udp, "udp6"},
                        {&o.unix_a, "unix stream"},
                        {&o.tcp_listener, "tcp4 listener"}};
  auto [a, b] = Channel::pair();
  for (const Case& w : wrong) {
    SCOPED_TRACE(std::string(w.named));
    BorrowedFd fds[] = {w.fd->borrow()};
    const auto seq = a.send({.type = 77, .fds = fds}, seconds(5));
    const auto before = test::open_fds();
    Caught c = catch_error([&] {
      (void)b.receive({.expect = Expect::tcp_stream, .allow_unix_sockets = true}, seconds(5));
    });
    EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
    EXPECT_TRUE(contains(c.what, "expected a TCP stream socket, got")) << c.what;
    EXPECT_TRUE(contains(c.what, w.named)) << c.what;
    EXPECT_EQ(c.seq, seq);
    EXPECT_EQ(c.type, 77);
    EXPECT_EQ(test::open_fds(), before);
  }
  // One bad descriptor among good ones rejects the whole message and closes all of it.
  BorrowedFd mixed[] = {o.tcp_server.borrow(), o.pipe_w.borrow(), o.tcp_client.borrow()};
  a.send({.fds = mixed}, seconds(5));
  const auto before = test::open_fds();
  Caught c = catch_error([&] { (void)b.receive({.expect = Expect::tcp_stream}, seconds(5)); });
  EXPECT_TRUE(contains(c.what, "descriptor 1:")) << c.what;
  EXPECT_EQ(test::open_fds(), before);
  o.pipe_w.reset();
  std::vector<Fd> read_end;
  read_end.push_back(std::move(o.pipe_r));
  expect_every_read_end_at_eof(read_end);
}

TEST_F(ChannelTraps, R15_EachExpectationAcceptsItsObjectAndTheSameSocketArrives) {
  Objects o = make_objects();
  struct Case {
    Expect expect;
    const Fd* fd;
  };
  const Case right[] = {
      {Expect::anything, &o.pipe_w},
      {Expect::anything, &o.file},
      {Expect::any_socket, &o.udp},
      {Expect::any_socket, &o.unix_a},
      {Expect::tcp_stream, &o.tcp_client},
      {Expect::tcp_stream, &o.tcp_server},
      {Expect::tcp_listener, &o.tcp_listener},
      {Expect::stream_listener, &o.tcp_listener},
      {Expect::stream_listener, &o.unix_listener},
      {Expect::stream, &o.tcp_server},
      {Expect::stream, &o.unix_a},
      {Expect::udp, &o.udp},
  };
  auto [a, b] = Channel::pair();
  for (const Case& r : right) {
    SCOPED_TRACE(std::string(to_string(r.expect)) + " / " + identify(r.fd->borrow()).describe());
    ASSERT_TRUE(r.fd->valid());
    BorrowedFd fds[] = {r.fd->borrow()};
    a.send({.fds = fds}, seconds(5));
    Message m = b.receive({.expect = r.expect, .allow_unix_sockets = true}, seconds(5));
    ASSERT_EQ(m.fds.size(), 1u);
    const SocketIdentity sent = identify(r.fd->borrow());
    const SocketIdentity got = identify(m.fds[0].borrow());
    EXPECT_EQ(got.inode, sent.inode);
    EXPECT_EQ(got.device, sent.device);
    EXPECT_EQ(got.cookie, sent.cookie);
  }
  // And the mismatches of the neighbouring expectations.
  const Case wrong[] = {
      {Expect::any_socket, &o.pipe_w},      {Expect::tcp_listener, &o.tcp_server},
      {Expect::udp, &o.tcp_client},         {Expect::stream, &o.tcp_listener},
      {Expect::stream_listener, &o.unix_a}, {Expect::tcp_stream, &o.udp},
  };
  for (const Case& w : wrong) {
    SCOPED_TRACE(std::string(to_string(w.expect)) + " / " + identify(w.fd->borrow()).describe());
    BorrowedFd fds[] = {w.fd->borrow()};
    a.send({.fds = fds}, seconds(5));
    Caught c = catch_error(
        [&] { (void)b.receive({.expect = w.expect, .allow_unix_sockets = true}, seconds(5)); });
    EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  }
}

// ---- R16 ----

TEST_F(ChannelTraps, R16_RefusedDescriptorsFailAtTheSender) {
  auto [a, b] = Channel::pair();
  if (!b.refuse_descriptors()) GTEST_SKIP() << "kernel without SO_PASSRIGHTS (Linux < 6.16)";
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  Caught c = catch_error([&] { (void)a.try_send({.payload = bytes("fd"), .fds = fds}); });
  EXPECT_EQ(c.kind, ErrorKind::refused) << c.what;
  EXPECT_EQ(c.code, EPERM) << c.what;
  // Nothing was queued, the sender keeps its descriptor, plain messages still pass.
  EXPECT_FALSE(b.try_receive().has_value());
  EXPECT_TRUE(has_cloexec(w.get()));
  const auto seq = a.send({.payload = bytes("plain")}, seconds(5));
  Message m = b.receive({}, seconds(5));
  EXPECT_EQ(m.payload_text(), "plain");
  EXPECT_EQ(m.seq, seq);
  EXPECT_EQ(seq, 1u) << "the refused send must not use a sequence number";
}

TEST_F(ChannelTraps, R16_ReceiverThatAcceptsNoDescriptorsClosesThem) {
  auto [a, b] = Channel::pair();
  Pipes pipes = make_pipes(2);
  auto fds = pipes.write_borrowed();
  a.send({.payload = bytes("unwanted"), .fds = fds}, seconds(5));
  pipes.write.clear();
  Caught c = catch_error([&] { (void)b.receive({.max_fds = 0}, seconds(5)); });
  EXPECT_EQ(c.kind, ErrorKind::protocol) << c.what;
  EXPECT_TRUE(contains(c.what, "at most 0 are accepted")) << c.what;
  expect_every_read_end_at_eof(pipes.read);
  a.send({.payload = bytes("fine")}, seconds(5));
  EXPECT_EQ(b.receive({.max_fds = 0}, seconds(5)).payload_text(), "fine");
}

// ---- EINTR, sequence numbers, concurrent senders ----

TEST_F(ChannelTraps, EintrIsRetriedOnSendReceiveAndAccept) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  BorrowedFd fds[] = {w.borrow()};
  sys::SeamGuard guard;
  sys::seam().sendmsg = failing_sendmsg;
  sys::seam().recvmsg = failing_recvmsg;
  sys::seam().accept4 = failing_accept4;

  inject(EINTR, 2);
  const auto seq = a.try_send({.payload = bytes("i"), .fds = fds});
  EXPECT_EQ(seq, std::optional<std::uint64_t>(1));
  EXPECT_EQ(g_send_calls.load(), 3);

  inject(EINTR, 2);
  auto m = b.try_receive();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->payload_text(), "i");
  EXPECT_EQ(m->fds.size(), 1u);
  EXPECT_EQ(g_recv_calls.load(), 3);

  const std::string name = "sockshare-eintr-" + std::to_string(::getpid());
  auto listener = ChannelListener::listen(parse_endpoint("unix:@" + name));
  Channel client = Channel::connect(listener.endpoint(), seconds(5));
  inject(EINTR, 1);
  Channel server = listener.accept(seconds(5));
  EXPECT_EQ(g_accept_calls.load(), 2);
  client.send({.payload = bytes("ok")}, seconds(5));
  inject(0, 0);
  EXPECT_EQ(server.receive({}, seconds(5)).payload_text(), "ok");
}

TEST_F(ChannelTraps, EintrDuringADeadlineWaitKeepsWaitingAndKeepsTheDeadline) {
  // A handler without SA_RESTART makes poll() fail with EINTR; the wait must go on with what
  // is left of its deadline, neither throwing nor restarting the full timeout.
  struct sigaction quiet {};
  quiet.sa_handler = [](int) {};
  struct sigaction saved {};
  ASSERT_EQ(::sigaction(SIGUSR1, &quiet, &saved), 0);
  auto [r1, w1] = test::make_pipe();
  auto [r2, w2] = test::make_pipe();
  const pthread_t waiter = ::pthread_self();
  std::atomic<bool> stop{false};
  std::atomic<int> sent{0};
  std::thread interrupter([&] {
    while (!stop.load()) {
      ::pthread_kill(waiter, SIGUSR1);
      ++sent;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      if (sent.load() == 50) (void)!::write(w2.get(), "x", 1);
    }
  });
  std::array<pollfd, 2> fds{pollfd{r1.get(), POLLIN, 0}, pollfd{r2.get(), POLLIN, 0}};
  EXPECT_EQ(sys::wait_any(fds, sys::deadline_after(seconds(10))), 1);
  EXPECT_GE(sent.load(), 50);
  EXPECT_EQ(fds[0].revents, 0);
  EXPECT_NE(fds[1].revents & POLLIN, 0);
  // Nothing ready: back at the deadline, interrupted all the way.
  std::array<pollfd, 1> idle{pollfd{r1.get(), POLLIN, 0}};
  const auto begin = std::chrono::steady_clock::now();
  EXPECT_EQ(sys::wait_any(idle, sys::deadline_after(std::chrono::milliseconds(150))), 0);
  const auto took = std::chrono::steady_clock::now() - begin;
  EXPECT_GE(took, std::chrono::milliseconds(149));
  EXPECT_LT(took, seconds(5));
  stop = true;
  interrupter.join();
  ::sigaction(SIGUSR1, &saved, nullptr);
}

TEST_F(ChannelTraps, SequenceNumbersStartAtOneAndIncreaseByOne) {
  auto [a, b] = Channel::pair();
  for (std::uint64_t i = 1; i <= 5; ++i) EXPECT_EQ(a.send({.type = 1}, seconds(5)), i);
  for (std::uint64_t i = 1; i <= 5; ++i) EXPECT_EQ(b.receive({}, seconds(5)).seq, i);
  // Each direction counts on its own.
  EXPECT_EQ(b.send({.type = 1}, seconds(5)), 1u);
  EXPECT_EQ(a.receive({}, seconds(5)).seq, 1u);
  // A moved channel continues its numbering.
  Channel moved = std::move(a);
  EXPECT_EQ(moved.send({.type = 1}, seconds(5)), 6u);
  EXPECT_EQ(b.receive({}, seconds(5)).seq, 6u);
}

TEST_F(ChannelTraps, ConcurrentSendersLoseNothingAndNumbersStayInOrder) {
  auto [a, b] = Channel::pair();
  auto [r, w] = test::make_pipe();
  constexpr int kPerThread = 2000;
  std::atomic<bool> failed{false};
  auto sender = [&](char tag) {
    BorrowedFd fds[] = {w.borrow()};
    for (int i = 0; i < kPerThread && !failed; ++i) {
      std::string text = std::string(1, tag) + std::to_string(i);
      try {
        // Every 16th message carries a descriptor, so both kinds interleave.
        a.send(
            {.payload = bytes(text),
             .fds = i % 16 == 0 ? std::span<const BorrowedFd>(fds) : std::span<const BorrowedFd>()},
            seconds(10));
      } catch (const Error&) {
        failed = true;
      }
    }
  };
  std::thread t1(sender, 'a');
  std::thread t2(sender, 'b');
  int next_a = 0;
  int next_b = 0;
  Message m;
  for (std::uint64_t expected = 1; expected <= 2 * kPerThread; ++expected) {
    b.receive(m, {}, seconds(10));
    ASSERT_EQ(m.seq, expected);
    const std::string text(m.payload_text());
    int& next = text[0] == 'a' ? next_a : next_b;
    ASSERT_EQ(text.substr(1), std::to_string(next)) << "lost or reordered within one sender";
    EXPECT_EQ(m.fds.size(), next % 16 == 0 ? 1u : 0u);
    ++next;
  }
  t1.join();
  t2.join();
  EXPECT_FALSE(failed.load());
  EXPECT_EQ(next_a, kPerThread);
  EXPECT_EQ(next_b, kPerThread);
  EXPECT_FALSE(b.try_receive().has_value());
}

}  // namespace
}  // namespace sockshare
