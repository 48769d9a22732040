// The per-connection metadata codec and the Prometheus rendering of the dispatcher's stats.
#include <gtest/gtest.h>

#include <cstring>

#include "sockshare/dispatch.hpp"

namespace sockshare::dispatch {
namespace {

ConnectionInfo sample() {
  ConnectionInfo info;
  info.id = 0x0102030405060708ULL;
  info.listener = "web";
  info.peer = "[::1]:4000";
  info.accepted_at_ns = 1'700'000'000'123'456'789LL;
  const char first[] = "GET / HTTP/1.1\r\n";
  info.initial_bytes.resize(sizeof first - 1);
  std::memcpy(info.initial_bytes.data(), first, sizeof first - 1);
  return info;
}

void expect_protocol_error(std::span<const std::byte> bytes) {
  try {
    (void)decode_connection_info(bytes);
    ADD_FAILURE() << "decoded " << bytes.size() << " malformed bytes";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::protocol);
  }
}

TEST(ConnectionInfoCodec, S6_RoundTrip) {
  const ConnectionInfo info = sample();
  const auto bytes = encode_connection_info(info);
  EXPECT_EQ(bytes.size(), 28u + 3 + 10 + 16);
  const ConnectionInfo back = decode_connection_info(bytes);
  EXPECT_EQ(back.id, info.id);
  EXPECT_EQ(back.listener, info.listener);
  EXPECT_EQ(back.peer, info.peer);
  EXPECT_EQ(back.accepted_at_ns, info.accepted_at_ns);
  EXPECT_EQ(back.initial_bytes, info.initial_bytes);
}

TEST(ConnectionInfoCodec, S6_EncodingIntoAUsedBufferLeavesNothingOfTheOldContents) {
  std::vector<std::byte> buffer;
  encode_connection_info(sample(), buffer);
  ConnectionInfo small;
  small.id = 9;
  small.listener = "a";
  small.peer = "unix";
  encode_connection_info(small, buffer);
  EXPECT_EQ(buffer, encode_connection_info(small));
  const ConnectionInfo back = decode_connection_info(buffer);
  EXPECT_EQ(back.listener, "a");
  EXPECT_EQ(back.peer, "unix");
  EXPECT_TRUE(back.initial_bytes.empty());
}

TEST(ConnectionInfoCodec, S6_LayoutIsLittleEndianAsDocumented) {
  const auto bytes = encode_connection_info(sample());
  EXPECT_EQ(bytes[0], std::byte{1});     // version
  EXPECT_EQ(bytes[2], std::byte{3});     // listener_len, low byte
  EXPECT_EQ(bytes[4], std::byte{10});    // peer_len, low byte
  EXPECT_EQ(bytes[8], std::byte{0x08});  // id, least significant byte first
  EXPECT_EQ(bytes[15], std::byte{0x01});
  EXPECT_EQ(bytes[24], std::byte{16});   // initial_len
  EXPECT_EQ(static_cast<char>(bytes[28]), 'w');
}

TEST(ConnectionInfoCodec, S6_MalformedInputIsAProtocolError) {
  const auto good = encode_connection_info(sample());
  for (std::size_t cut = 0; cut < good.size(); ++cut) {
    expect_protocol_error(std::span(good).first(cut));  // every truncation
  }
  auto longer = good;
  longer.push_back(std::byte{0});
  expect_protocol_error(longer);  // trailing byte
  auto version = good;
  version[0] = std::byte{2};
  expect_protocol_error(version);
  auto flags = good;
  flags[1] = std::byte{1};
  expect_protocol_error(flags);
  auto reserved = good;
  reserved[7] = std::byte{1};
  expect_protocol_error(reserved);
  auto huge = good;
  huge[27] = std::byte{0xFF};  // initial_len near 4 GiB
  expect_protocol_error(huge);
}

TEST(ConnectionInfoCodec, S6_EmptyFieldsRoundTrip) {
  const ConnectionInfo info;
  const auto back = decode_connection_info(encode_connection_info(info));
  EXPECT_TRUE(back.listener.empty());
  EXPECT_TRUE(back.peer.empty());
  EXPECT_TRUE(back.initial_bytes.empty());
}

TEST(DispatchStats, S6_PrometheusTextFormat) {
  Stats s;
  s.accepted = 7;
  s.acknowledged = 5;
  s.in_flight = 2;
  s.latency_bounds_us = {100, 1000};
  s.latency_counts = {3, 1, 1};
  s.latency_sum_us = 2500;
  const std::string text = s.prometheus();
  EXPECT_NE(text.find("# HELP sockshare_connections_accepted_total "), std::string::npos);
  EXPECT_NE(text.find("# TYPE sockshare_connections_accepted_total counter\n"
                      "sockshare_connections_accepted_total 7\n"),
            std::string::npos);
  EXPECT_NE(text.find("# TYPE sockshare_connections_in_flight gauge\nsockshare_connections_in_flight 2\n"),
            std::string::npos);
  EXPECT_NE(text.find("# TYPE sockshare_handoff_latency_seconds histogram\n"), std::string::npos);
  // Buckets are cumulative, in seconds, ending with +Inf = _count.
  EXPECT_NE(text.find("sockshare_handoff_latency_seconds_bucket{le=\"0.0001\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("sockshare_handoff_latency_seconds_bucket{le=\"0.001\"} 4\n"), std::string::npos);
  EXPECT_NE(text.find("sockshare_handoff_latency_seconds_bucket{le=\"+Inf\"} 5\n"), std::string::npos);
  EXPECT_NE(text.find("sockshare_handoff_latency_seconds_sum 0.0025\n"), std::string::npos);
  EXPECT_NE(text.find("sockshare_handoff_latency_seconds_count 5\n"), std::string::npos);
  // Every sample line belongs to a metric announced by TYPE.
  std::size_t types = 0;
  for (std::size_t at = text.find("# TYPE"); at != std::string::npos; at = text.find("# TYPE", at + 1)) ++types;
  EXPECT_EQ(types, 18u);
}

}  // namespace
}  // namespace sockshare::dispatch
