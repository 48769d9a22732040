// The handoff protocol's payload and metadata codecs: round trips and strict rejection.
#include <sys/socket.h>

#include <string>
#include <vector>

#include "sockshare/handoff.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using namespace handoff;

std::vector<std::byte> raw(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

ListenerMeta sample() {
  ListenerMeta m;
  m.name = "web";
  m.endpoint = "127.0.0.1:8080";
  m.family = AF_INET;
  m.type = SOCK_STREAM;
  m.protocol = 6;
  m.cookie = 0x1122334455667788ULL;
  return m;
}

TEST(HandoffCodec, TypesAreInTheControlRange) {
  EXPECT_EQ(kTypeFirst, 0x8380);
  EXPECT_EQ(kTypeLast, 0x838F);
  for (auto t : {kTypeHello, kTypeListeners, kTypeAck, kTypeAbort, kTypeRefused, kTypeReleased}) {
    EXPECT_GE(t, kTypeFirst);
    EXPECT_LE(t, kTypeLast);
    EXPECT_EQ(t & 0xFF00, wire::kTypeControlBase);
  }
}

TEST(HandoffCodec, MetaRoundTripAndExactLayout) {
  ListenerMeta m = sample();
  m.control = true;
  const auto bytes = encode_meta(m);
  ASSERT_EQ(bytes.size(), 20u + 3 + 14);
  EXPECT_EQ(bytes[0], std::byte{1});     // version
  EXPECT_EQ(bytes[1], std::byte{1});     // control flag
  EXPECT_EQ(bytes[2], std::byte{AF_INET});
  EXPECT_EQ(bytes[8], std::byte{0x88});  // cookie, little-endian
  EXPECT_EQ(bytes[16], std::byte{3});    // name length
  EXPECT_EQ(bytes[18], std::byte{14});   // endpoint length
  ListenerMeta back;
  ASSERT_TRUE(decode_meta(bytes, back).ok);
  EXPECT_EQ(back.name, m.name);
  EXPECT_EQ(back.endpoint, m.endpoint);
  EXPECT_EQ(back.family, m.family);
  EXPECT_EQ(back.type, m.type);
  EXPECT_EQ(back.protocol, m.protocol);
  EXPECT_EQ(back.cookie, m.cookie);
  EXPECT_TRUE(back.control);
}

TEST(HandoffCodec, MetaRejectsMalformedEntries) {
  const auto good = encode_meta(sample());
  ListenerMeta out;
  for (std::size_t n = 0; n < good.size(); ++n) {
    EXPECT_FALSE(decode_meta(std::span(good).first(n), out).ok) << "truncated to " << n;
  }
  auto trailing = good;
  trailing.push_back(std::byte{0});
  EXPECT_FALSE(decode_meta(trailing, out).ok);
  auto version = good;
  version[0] = std::byte{2};
  EXPECT_FALSE(decode_meta(version, out).ok);
  auto flags = good;
  flags[1] = std::byte{0x02};
  EXPECT_FALSE(decode_meta(flags, out).ok);
  auto colon = good;
  colon[20] = std::byte{':'};  // first byte of the name
  EXPECT_FALSE(decode_meta(colon, out).ok);
  auto empty_name = encode_meta(sample());
  empty_name[16] = std::byte{0};
  empty_name.erase(empty_name.begin() + 20, empty_name.begin() + 23);
  EXPECT_FALSE(decode_meta(empty_name, out).ok);
}

TEST(HandoffCodec, MetaEncoderRefusesWhatTheDecoderWouldReject) {
  ListenerMeta m = sample();
  m.name = "a:b";
  EXPECT_THROW((void)encode_meta(m), Error);
  m = sample();
  m.endpoint.assign(kMaxEndpointLength + 1, 'x');
  EXPECT_THROW((void)encode_meta(m), Error);
}

TEST(HandoffCodec, FixedPayloads) {
  Hello hello;
  ASSERT_TRUE(decode(encode(Hello{}), hello).ok);
  EXPECT_EQ(hello.version, kProtocolVersion);
  EXPECT_FALSE(decode(raw({1, 0, 0}), hello).ok);
  EXPECT_FALSE(decode(raw({1, 0, 1, 0}), hello).ok);  // reserved

  Batch batch;
  ASSERT_TRUE(decode(encode(Batch{253, 300}), batch).ok);
  EXPECT_EQ(batch.first_index, 253u);
  EXPECT_EQ(batch.total, 300u);
  EXPECT_TRUE(decode(encode(Batch{0, 0}), batch).ok);  // an empty set
  EXPECT_FALSE(decode(encode(Batch{1, 0}), batch).ok);
  EXPECT_FALSE(decode(encode(Batch{5, 5}), batch).ok);
  EXPECT_FALSE(decode(encode(Batch{0, kMaxListeners + 2}), batch).ok);

  Ack ack;
  ASSERT_TRUE(decode(encode(Ack{17}), ack).ok);
  EXPECT_EQ(ack.count, 17u);
  EXPECT_FALSE(decode(raw({1, 0, 0, 0, 0, 0, 0, 1}), ack).ok);

  Refusal refusal;
  ASSERT_TRUE(decode(encode(Refusal{Reason::busy, "in progress"}), refusal).ok);
  EXPECT_EQ(refusal.reason, Reason::busy);
  EXPECT_EQ(refusal.text, "in progress");
  EXPECT_FALSE(decode(raw({0, 0}), refusal).ok);
  EXPECT_FALSE(decode(raw({99, 0}), refusal).ok);
  EXPECT_FALSE(decode(raw({1}), refusal).ok);
  // The encoder caps the text so a refusal always fits the decoder's limit.
  EXPECT_TRUE(decode(encode(Refusal{Reason::busy, std::string(5000, 'x')}), refusal).ok);
  EXPECT_EQ(refusal.text.size(), kMaxReasonLength);
}

}  // namespace
}  // namespace sockshare
