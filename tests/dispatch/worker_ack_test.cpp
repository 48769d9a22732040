#include <gtest/gtest.h>

#include <cstring>

#include "sockshare/channel.hpp"
#include "sockshare/dispatch.hpp"
#include "sockshare/socket.hpp"
#include "support/harness.hpp"

namespace sockshare::dispatch {
namespace {

class WorkerAck : public test::FdLeakTest {};

// R12: a connection the worker took is acknowledged even when a later message in the same
// poll() is bad; otherwise the dispatcher would hand the same connection to a second worker.
TEST_F(WorkerAck, R12_ConnectionsTakenBeforeABadMessageAreStillAcknowledged) {
  auto [dispatcher_end, worker_end] = Channel::pair();
  Worker worker(std::move(worker_end), 0);
  Message hello = dispatcher_end.receive({}, std::chrono::seconds(5));
  ASSERT_EQ(hello.type, kHello);

  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  Fd client = connect_to(local_endpoint(listener.borrow()));
  ConnectionInfo info;
  info.id = 42;
  info.listener = "web";
  info.peer = "127.0.0.1:1";
  const auto meta = encode_connection_info(info);
  std::span<const std::byte> metas[] = {meta};
  BorrowedFd fds[] = {client.borrow()};
  dispatcher_end.send({.type = kConnections, .fds = fds, .fd_meta = metas});
  dispatcher_end.send({.type = 0x82FF});  // a type the worker does not know

  std::vector<Connection> out;
  EXPECT_THROW(worker.poll(out), Error);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].info.id, 42u);

  Message ack = dispatcher_end.receive({.max_fds = 0}, std::chrono::seconds(5));
  ASSERT_EQ(ack.type, kAck);
  ASSERT_EQ(ack.payload.size(), 8u);
  std::uint64_t acked = 0;
  std::memcpy(&acked, ack.payload.data(), 8);  // little-endian on the wire and on x86-64
  EXPECT_EQ(acked, 42u);
}

}  // namespace
}  // namespace sockshare::dispatch
