// docs/WIRE.md as executable checks: the worked example is byte for byte what the channel
// sends, and every rule of the header and metadata sections is enforced by the decoder.
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "sockshare/channel.hpp"
#include "sockshare/wire.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using std::chrono::seconds;

std::span<const std::byte> bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// docs/WIRE.md section 10.
constexpr std::array<std::uint8_t, 41> kWorkedExample = {
    0x53, 0x4b, 0x53, 0x48, 0x01, 0x01, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, 0x07, 0x00,
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x74, 0x63, 0x70, 0x68, 0x69};

std::vector<std::byte> example() {
  std::vector<std::byte> out(kWorkedExample.size());
  std::memcpy(out.data(), kWorkedExample.data(), out.size());
  return out;
}

class WireFormat : public test::FdLeakTest {};

TEST_F(WireFormat, WorkedExampleOfTheSpecIsWhatTheChannelSends) {
  auto [a, b] = Channel::pair();
  Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(tcp.valid());
  BorrowedFd fds[] = {tcp.borrow()};
  std::span<const std::byte> meta[] = {bytes("tcp")};
  ASSERT_EQ(a.send({.type = 7, .payload = bytes("hi"), .fds = fds, .fd_meta = meta}, seconds(5)),
            1u);

  // Read it raw, as a program in another language would.
  std::array<std::byte, 128> data{};
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * 4)> control{};
  iovec iov{data.data(), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  const ssize_t n = ::recvmsg(b.native_handle().get(), &msg, MSG_CMSG_CLOEXEC);
  ASSERT_EQ(n, static_cast<ssize_t>(kWorkedExample.size()));
  EXPECT_EQ(std::memcmp(data.data(), kWorkedExample.data(), kWorkedExample.size()), 0);
  EXPECT_EQ(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC), 0);

  // Exactly one SCM_RIGHTS control message with the one descriptor.
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->cmsg_level, SOL_SOCKET);
  EXPECT_EQ(c->cmsg_type, SCM_RIGHTS);
  ASSERT_EQ(c->cmsg_len, CMSG_LEN(sizeof(int)));
  int received = -1;
  std::memcpy(&received, CMSG_DATA(c), sizeof received);
  Fd owned(received);
  EXPECT_EQ(identify(owned.borrow()).cookie, identify(tcp.borrow()).cookie);
  EXPECT_EQ(CMSG_NXTHDR(&msg, c), nullptr);

  // And the decoder reads it back.
  wire::Header h;
  auto ex = example();
  ASSERT_TRUE(wire::decode_header(ex, ex.size(), h).ok);
  EXPECT_EQ(h.type, 7);
  EXPECT_EQ(h.seq, 1u);
  EXPECT_EQ(h.fd_count, 1);
  EXPECT_EQ(h.meta_len, 7u);
  EXPECT_EQ(h.payload_len, 2u);
}

TEST(WireFormatRules, EveryHeaderRuleOfTheSpecIsEnforced) {
  struct Case {
    const char* rule;
    std::function<void(std::vector<std::byte>&)> mutate;
    const char* error;
  };
  auto set = [](std::vector<std::byte>& m, std::size_t off, std::uint8_t v) {
    m[off] = std::byte{v};
  };
  const Case cases[] = {
      {"magic", [&](auto& m) { set(m, 0, 0x54); }, "bad magic"},
      {"version", [&](auto& m) { set(m, 4, 2); }, "unsupported version 2"},
      {"unknown flag", [&](auto& m) { set(m, 5, 0x03); }, "unknown flags"},
      {"reserved at 7", [&](auto& m) { set(m, 7, 1); }, "non-zero reserved"},
      {"reserved at 10", [&](auto& m) { set(m, 11, 1); }, "non-zero reserved"},
      {"reserved at 28", [&](auto& m) { set(m, 31, 1); }, "non-zero reserved"},
      {"fd_count 254", [&](auto& m) { set(m, 6, 254); }, "fd_count 254 > 253"},
      {"seq 0", [&](auto& m) { set(m, 16, 0); }, "sequence number 0"},
      {"meta_len without flag", [&](auto& m) { set(m, 5, 0); }, "without the metadata flag"},
      {"flag without fds",
       [&](auto& m) {
         set(m, 6, 0);
         set(m, 12, 0);
         set(m, 24, 9);
       },
       "metadata flag on a message without descriptors"},
      {"meta_len below table",
       [&](auto& m) {
         set(m, 6, 2);
         set(m, 12, 7);
       },
       "metadata section too short"},
      {"lengths too long", [&](auto& m) { set(m, 24, 3); }, "lengths announce 42 bytes"},
      {"lengths too short", [&](auto& m) { m.push_back(std::byte{0}); }, "lengths announce 41"},
      {"32-bit overflow",
       [&](auto& m) {
         for (int i = 24; i < 28; ++i) set(m, i, 0xFF);
       },
       "lengths announce 4294967334"},
      {"shorter than header", [&](auto& m) { m.resize(31); }, "shorter than the 32-byte"},
      {"longer than the limit", [&](auto& m) { m.resize(wire::kMaxMessage + 1); },
       "exceeds the 65536-byte limit"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.rule);
    auto m = example();
    c.mutate(m);
    wire::Header h;
    auto result = wire::decode_header(m, m.size(), h);
    EXPECT_FALSE(result.ok);
    EXPECT_NE(result.error.find(c.error), std::string::npos) << result.error;
  }
}

TEST(WireFormatRules, MetadataSectionMustBeExact) {
  std::vector<std::vector<std::byte>> out;
  auto section = [](std::initializer_list<std::uint8_t> b) {
    std::vector<std::byte> v;
    for (auto x : b) v.push_back(std::byte{x});
    return v;
  };
  EXPECT_TRUE(wire::decode_metadata(section({1, 0, 0, 0, 0, 0, 0, 0, 'a'}), 2, out).ok);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].size(), 1u);
  EXPECT_TRUE(out[1].empty());
  EXPECT_FALSE(wire::decode_metadata(section({1, 0, 0, 0}), 2, out).ok);       // table cut short
  EXPECT_FALSE(wire::decode_metadata(section({2, 0, 0, 0, 'a'}), 1, out).ok);  // entry overruns
  EXPECT_FALSE(wire::decode_metadata(section({0, 0, 0, 0, 'x'}), 1, out).ok);  // trailing byte
  EXPECT_FALSE(wire::decode_metadata(section({0xFF, 0xFF, 0xFF, 0xFF}), 1, out).ok);

  std::span<const std::byte> items[] = {bytes("first"), bytes(""), bytes("3")};
  std::vector<std::byte> encoded;
  wire::encode_metadata(items, encoded);
  EXPECT_EQ(encoded.size(), wire::metadata_size(items));
  ASSERT_TRUE(wire::decode_metadata(encoded, 3, out).ok);
  EXPECT_EQ(out[0].size(), 5u);
  EXPECT_EQ(out[2].size(), 1u);
}

TEST(WireFormatRules, MessageTypeRangesSplitApplicationFromSockshare) {
  static_assert(wire::kTypeApplicationLast + 1 == wire::kTypeReservedBase);
  EXPECT_FALSE(wire::is_reserved_type(wire::kTypeApplicationFirst));
  EXPECT_FALSE(wire::is_reserved_type(wire::kTypeApplicationLast));
  EXPECT_TRUE(wire::is_reserved_type(wire::kTypeReservedBase));
  for (auto base : {wire::kTypeGrantBase, wire::kTypeDispatchBase, wire::kTypeControlBase}) {
    EXPECT_TRUE(wire::is_reserved_type(base));
    EXPECT_EQ(base & 0xFF, 0);
  }
  EXPECT_TRUE(wire::is_reserved_type(0xFFFF));
}

}  // namespace
}  // namespace sockshare
