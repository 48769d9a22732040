// SocketInfo: binary layout, printable form and the parser's refusals (S2).
#include <cstring>
#include <string>

#include "sockshare/error.hpp"
#include "sockshare/grant.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

SocketInfo sample() {
  SocketInfo info;
  info.mode = ShareMode::move;
  info.flags = SocketInfo::kFlagFastPath;
  info.family = 10;
  info.type = 1;
  info.protocol = 6;
  info.cookie = 0x0102030405060708ULL;
  info.source_pid = 4711;
  info.source_uid = 1000;
  info.source_inode = 0xAABBCCDDEEFF0011ULL;
  info.target_pid = 4712;
  info.target_uid = 1000;
  info.target_inode = 0x1122334455667788ULL;
  info.expires_ns = 123456789012345ULL;
  for (std::size_t i = 0; i < info.token.size(); ++i)
    info.token[i] = static_cast<std::uint8_t>(0xF0 + i);
  const std::string ep = "@sockshare-4711-0123456789abcdef";
  std::memcpy(info.endpoint.data(), ep.data(), ep.size());
  return info;
}

// A share grant offering direct redemption of the source's descriptor 42.
SocketInfo direct_sample() {
  SocketInfo info = sample();
  info.mode = ShareMode::share;
  info.flags = SocketInfo::kFlagFastPath | SocketInfo::kFlagDirect;
  info.source_fd = 42;
  return info;
}

// Expects `text` to be refused with invalid_input and a message containing `why`.
void expect_refused(const std::string& text, const std::string& why) {
  try {
    (void)SocketInfo::parse(text);
    ADD_FAILURE() << "accepted: " << text;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_input) << e.what();
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << why << "\"";
  }
}

TEST(SocketInfoText, S2_FormatParseRoundTripIsExact) {
  const SocketInfo info = sample();
  const std::string text = info.format();
  EXPECT_EQ(text.size(), SocketInfo::kTextSize);
  EXPECT_EQ(text.rfind("sockshare1:", 0), 0u);
  // Safe in argv, environment values and file names: no spaces, quotes or shell specials.
  for (char c : text.substr(11)) {
    EXPECT_TRUE(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') << c;
  }
  EXPECT_EQ(SocketInfo::parse(text), info);
  EXPECT_EQ(SocketInfo::parse("  " + text + "\n"), info);  // a line from a file or a pipe
  const auto bytes = info.to_bytes();
  EXPECT_EQ(SocketInfo::from_bytes(bytes), info);
  EXPECT_EQ(info.grant_endpoint().kind, Endpoint::Kind::unix_abstract);
  EXPECT_EQ(info.grant_endpoint().path, "sockshare-4711-0123456789abcdef");
}

TEST(SocketInfoText, S2_BinaryLayoutIsLittleEndianAndStable) {
  const auto bytes = sample().to_bytes();
  ASSERT_EQ(bytes.size(), 200u);
  EXPECT_EQ(std::memcmp(bytes.data(), "SKGI", 4), 0);       // magic
  EXPECT_EQ(std::to_integer<int>(bytes[4]), 1);             // version, low byte first
  EXPECT_EQ(std::to_integer<int>(bytes[6]), 1);             // mode: move
  EXPECT_EQ(std::to_integer<int>(bytes[20]), 0x08);         // cookie, low byte first
  EXPECT_EQ(std::to_integer<int>(bytes[28]), 0xFF);         // no descriptor number: -1
  EXPECT_EQ(std::to_integer<int>(bytes[32]), 4711 & 0xFF);  // source pid
  const auto direct = direct_sample().to_bytes();
  EXPECT_EQ(std::to_integer<int>(direct[7]), 0x03);   // flags: fast path | direct
  EXPECT_EQ(std::to_integer<int>(direct[28]), 0x2A);  // descriptor number 42
  EXPECT_EQ(std::to_integer<int>(direct[29]), 0);
}

TEST(SocketInfoText, S2_DirectInfoRoundTripsWithItsDescriptorNumber) {
  const SocketInfo info = direct_sample();
  const std::string text = info.format();
  EXPECT_EQ(text.size(), SocketInfo::kTextSize);
  const SocketInfo back = SocketInfo::parse(text);
  EXPECT_EQ(back, info);
  EXPECT_EQ(back.source_fd, 42);
  EXPECT_NE(back.describe().find("share, direct"), std::string::npos) << back.describe();
}

TEST(SocketInfoText, GarbageTruncatedWrongVersionAndDamagedTextRefused) {
  const std::string good = sample().format();
  expect_refused("", "prefix");
  expect_refused("hello world", "prefix");
  expect_refused("sockshare", "version");
  expect_refused("sockshare1:", "expected 267");
  expect_refused(good.substr(0, good.size() - 1), "truncated");
  expect_refused(good.substr(0, 100), "truncated");
  expect_refused(good + "A", "expected 267");
  expect_refused("sockshare2:" + good.substr(11), "version 2 is not supported");
  expect_refused("sockshare01:" + good.substr(11), "version 01 is not supported");
  std::string bad_char = good;
  bad_char[40] = '+';  // standard base64, not base64url
  expect_refused(bad_char, "not base64url");
  std::string flipped = good;
  flipped[60] = flipped[60] == 'A' ? 'B' : 'A';
  expect_refused(flipped, "checksum");
  // The last character carries 2 bits of data and 4 unused bits that must be zero.
  std::string stray = good;
  stray.back() = stray.back() == 'A' ? 'B' : static_cast<char>(stray.back() + 1);
  expect_refused(stray, "non-canonical");
}

TEST(SocketInfoText, FieldsOutsideTheContractRefused) {
  auto refuse_bytes = [](SocketInfo info, const std::string& why) {
    auto bytes = info.to_bytes();  // a valid checksum over invalid content
    try {
      (void)SocketInfo::from_bytes(bytes);
      ADD_FAILURE() << "accepted " << why;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_input);
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  SocketInfo info = sample();
  info.flags = 0x80;
  refuse_bytes(info, "unknown flags");
  info = sample();
  info.mode = static_cast<ShareMode>(7);
  refuse_bytes(info, "unknown mode");
  info = sample();
  info.version = 2;
  refuse_bytes(info, "version 2");
  info = sample();
  info.endpoint.fill('x');
  refuse_bytes(info, "endpoint not terminated");
  info = sample();
  info.endpoint.fill('\0');
  refuse_bytes(info, "endpoint must be");
  info = sample();
  info.endpoint[60] = 'z';  // garbage hidden after the terminator
  refuse_bytes(info, "padding");
  info = sample();
  info.target_pid = 0;
  refuse_bytes(info, "pid");
  // Direct redemption: share only, with a number and a cookie; a number only with the flag.
  info = direct_sample();
  info.mode = ShareMode::move;
  refuse_bytes(info, "direct redemption offered for a move grant");
  info = direct_sample();
  info.source_fd = -1;
  refuse_bytes(info, "without a descriptor number");
  info = direct_sample();
  info.cookie = 0;
  refuse_bytes(info, "without a socket cookie");
  info = sample();
  info.source_fd = 3;
  refuse_bytes(info, "descriptor number set without the direct flag");
  const auto bytes = sample().to_bytes();
  try {
    (void)SocketInfo::from_bytes(std::span(bytes).first(199));
    ADD_FAILURE() << "accepted 199 bytes";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_input);
  }
}

}  // namespace
}  // namespace sockshare
