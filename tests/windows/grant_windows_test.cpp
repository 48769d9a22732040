// The Windows backend against the shared-sockets contract (S1-S8) and the grant's own rules
// (single use, expiry, revocation, squatters, garbage). Runs under Wine in CI: Wine's
// WSASocketW checks nothing, so every refusal here is sockshare's own envelope at work.
#include <gtest/gtest.h>
#include <winsock2.h>
#include <windows.h>
#include <ws2tcpip.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "sockshare/error.hpp"
#include "sockshare/windows/grant.hpp"
#include "win_harness.hpp"

namespace sockshare::windows {
namespace {

using namespace std::chrono_literals;
using wintest::Child;
using wintest::HelperContext;

// Every test socket is non-inheritable, so no helper can hold a copy by accident (S8).
SocketHandle tcp_socket() {
  ensure_winsock();
  SocketHandle s(::WSASocketW(AF_INET, SOCK_STREAM, IPPROTO_TCP, nullptr, 0,
                              WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT));
  if (!s.valid()) throw std::runtime_error("WSASocketW: " + std::to_string(::WSAGetLastError()));
  return s;
}

struct TcpPair {
  SocketHandle client;  // the remote peer
  SocketHandle server;  // the accepted socket that gets shared
};

TcpPair tcp_pair() {
  SocketHandle listener = tcp_socket();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  int len = sizeof addr;
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listener.get(), 4) != 0 ||
      ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("listen on 127.0.0.1:0 failed: " + std::to_string(::WSAGetLastError()));
  }
  TcpPair pair;
  pair.client = tcp_socket();
  if (::connect(pair.client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    throw std::runtime_error("connect failed: " + std::to_string(::WSAGetLastError()));
  }
  pair.server = SocketHandle(::accept(listener.get(), nullptr, nullptr));
  if (!pair.server.valid()) throw std::runtime_error("accept failed");
  ::SetHandleInformation(reinterpret_cast<HANDLE>(pair.server.get()), HANDLE_FLAG_INHERIT, 0);
  return pair;
}

void send_all(SOCKET s, std::string_view text) {
  while (!text.empty()) {
    const int n = ::send(s, text.data(), static_cast<int>(text.size()), 0);
    if (n <= 0) throw std::runtime_error("send failed: " + std::to_string(::WSAGetLastError()));
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

// Reads up to `n` bytes within `timeout`; "<eof>" appended if the peer closed.
std::string receive(SOCKET s, std::size_t n, std::chrono::milliseconds timeout = 10s) {
  std::string out;
  const auto deadline = ::GetTickCount64() + static_cast<std::uint64_t>(timeout.count());
  while (out.size() < n) {
    const std::uint64_t now = ::GetTickCount64();
    if (now >= deadline) break;
    fd_set readable;
    FD_ZERO(&readable);
    FD_SET(s, &readable);
    timeval tv{static_cast<long>((deadline - now) / 1000), static_cast<long>((deadline - now) % 1000 * 1000)};
    if (::select(0, &readable, nullptr, nullptr, &tv) <= 0) break;
    char buffer[256];
    const int got = ::recv(s, buffer, static_cast<int>(std::min<std::size_t>(sizeof buffer, n - out.size())), 0);
    if (got == 0) return out + "<eof>";
    if (got < 0) return out + "<error " + std::to_string(::WSAGetLastError()) + ">";
    out.append(buffer, static_cast<std::size_t>(got));
  }
  return out;
}

int get_int_option(SOCKET s, int level, int name) {
  int value = 0;  // Wine writes a single byte for SO_KEEPALIVE: the rest must already be 0
  int len = sizeof value;
  if (::getsockopt(s, level, name, reinterpret_cast<char*>(&value), &len) != 0) return -1;
  return value;
}

bool set_int_option(SOCKET s, int level, int name, int value) {
  return ::setsockopt(s, level, name, reinterpret_cast<const char*>(&value), sizeof value) == 0;
}

std::pair<int, int> option_name(const std::string& name) {
  if (name == "keepalive") return {SOL_SOCKET, SO_KEEPALIVE};
  if (name == "rcvbuf") return {SOL_SOCKET, SO_RCVBUF};
  return {IPPROTO_TCP, TCP_NODELAY};
}

// Records every GrantEvent so a test can wait for the server's verdict.
class EventLog {
 public:
  GrantServerOptions options() {
    GrantServerOptions o;
    o.on_event = [this](GrantEvent& event) {
      std::lock_guard lock(mutex_);
      outcomes_.push_back(event.outcome);
      details_.push_back(event.detail);
      returned_.push_back(std::move(event.returned));
      changed_.notify_all();
    };
    return o;
  }
  // The outcome of the `index`-th event, waiting for it.
  GrantOutcome wait(std::size_t index, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, timeout, [&] { return outcomes_.size() > index; })) {
      ADD_FAILURE() << "no grant event #" << index << " in time";
      return GrantOutcome::failed;
    }
    return outcomes_[index];
  }
  std::string detail(std::size_t index) {
    std::lock_guard lock(mutex_);
    return index < details_.size() ? details_[index] : "";
  }
  SocketHandle take_returned(std::size_t index) {
    std::lock_guard lock(mutex_);
    return index < returned_.size() ? std::move(returned_[index]) : SocketHandle();
  }
  std::size_t size() {
    std::lock_guard lock(mutex_);
    return outcomes_.size();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<GrantOutcome> outcomes_;
  std::vector<std::string> details_;
  std::vector<SocketHandle> returned_;
};

std::string describe(const Error& e) {
  return "error " + std::string(to_string(e.kind())) + ": " + e.what();
}

// A target process: redeems what it is told to and then does I/O and option calls on the
// redeemed socket on command, answering one line per command.
SOCKSHARE_WIN_HELPER(redeemer) {
  SocketHandle socket;
  HANDLE event = ::CreateEventW(nullptr, TRUE, FALSE, nullptr);
  ctx.send("ready");
  for (;;) {
    const std::string line = ctx.receive();
    if (line.empty() || line == "exit") return 0;
    const auto space = line.find(' ');
    const std::string command = line.substr(0, space);
    const std::string arg = space == std::string::npos ? "" : line.substr(space + 1);
    try {
      if (command == "redeem" || command == "redeem-file") {
        std::string text = arg;
        if (command == "redeem-file") {
          std::ifstream file(arg);
          std::getline(file, text);
        }
        socket = redeem(SocketInfo::parse(text));
        ctx.send("ok");
      } else if (command == "recv") {
        ctx.send("got " + receive(socket.get(), std::stoul(arg)));
      } else if (command == "send") {
        send_all(socket.get(), arg);
        ctx.send("sent");
      } else if (command == "getopt") {
        const auto [level, name] = option_name(arg);
        ctx.send(std::to_string(get_int_option(socket.get(), level, name)));
      } else if (command == "setopt") {
        const auto [level, name] = option_name(arg.substr(0, arg.find(' ')));
        const int value = std::stoi(arg.substr(arg.find(' ') + 1));
        ctx.send(set_int_option(socket.get(), level, name, value) ? "set" : "setsockopt failed");
      } else if (command == "hold-pipe") {
        // Connects to a grant pipe and says nothing: a silent (or malicious) redeemer.
        const std::wstring name(arg.begin(), arg.end());
        HANDLE pipe = ::CreateFileW(name.c_str(), GENERIC_READ | GENERIC_WRITE, 0, nullptr,
                                    OPEN_EXISTING, 0, nullptr);
        ctx.send(pipe == INVALID_HANDLE_VALUE ? "open failed " + std::to_string(::GetLastError())
                                              : "holding");
      } else if (command == "eventselect-read") {
        ctx.send(::WSAEventSelect(socket.get(), event, FD_READ) == 0 ? "registered"
                                                                    : "WSAEventSelect failed");
      } else if (command == "wait-event") {
        ctx.send(::WaitForSingleObject(event, static_cast<DWORD>(std::stoul(arg))) == WAIT_OBJECT_0
                     ? "signaled"
                     : "not signaled");
      } else if (command == "close") {
        socket.reset();
        ctx.send("closed");
      } else {
        ctx.send("unknown command " + command);
      }
    } catch (const Error& e) {
      ctx.send(describe(e));
    } catch (const std::exception& e) {
      ctx.send(std::string("exception: ") + e.what());
    }
  }
}

// Echoes the info it got through its command line and its environment, re-formatted.
SOCKSHARE_WIN_HELPER(echo_info) {
  try {
    const SocketInfo from_argv = SocketInfo::parse(ctx.args().at(0));
    const SocketInfo from_env = inherited_info("SOCKSHARE_INFO");
    ctx.send(from_argv.format() + " " + from_env.format());
  } catch (const Error& e) {
    ctx.send(describe(e));
  }
  return 0;
}

Child start_redeemer() {
  Child child = Child::helper("redeemer");
  EXPECT_EQ(child.receive(), "ready");
  return child;
}

TEST(WindowsGrant, S3_S5_ShareRedeemedHandleIsTheSameSocketUsedByBothProcesses) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  EXPECT_EQ(info.mode, ShareMode::share);
  EXPECT_EQ(info.family, AF_INET);
  EXPECT_EQ(info.type, SOCK_STREAM);
  EXPECT_EQ(info.target_pid, static_cast<std::int32_t>(target.pid()));
  EXPECT_EQ(info.endpoint_text(), grants.endpoint());
  EXPECT_EQ(info.endpoint_text().rfind("\\\\.\\pipe\\sockshare-", 0), 0U) << info.endpoint_text();

  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  EXPECT_EQ(log.wait(0), GrantOutcome::redeemed) << log.detail(0);
  EXPECT_EQ(grants.stats().redeemed, 1U);
  EXPECT_EQ(grants.stats().pending, 0U);

  // Both processes write to and read from the one connection (S5).
  send_all(pair.client.get(), "hello");
  EXPECT_EQ(target.ask("recv 5"), "got hello");
  EXPECT_EQ(target.ask("send world"), "sent");
  EXPECT_EQ(receive(pair.client.get(), 5), "world");
  send_all(pair.server.get(), "source");
  EXPECT_EQ(receive(pair.client.get(), 6), "source");
  send_all(pair.client.get(), "again");
  EXPECT_EQ(receive(pair.server.get(), 5), "again");
  target.send("exit");
  EXPECT_EQ(target.wait_exit(), 0U);
}

TEST(WindowsGrant, S5_MoveClosesTheSourceCopyAfterTheAck) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.move(std::move(pair.server), Target::pid(target.pid()));
  EXPECT_FALSE(pair.server.valid());
  EXPECT_EQ(info.mode, ShareMode::move);
  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  ASSERT_EQ(log.wait(0), GrantOutcome::redeemed) << log.detail(0);
  EXPECT_FALSE(log.take_returned(0).valid());
  EXPECT_EQ(target.ask("send moved"), "sent");
  EXPECT_EQ(receive(pair.client.get(), 5), "moved");
  // The target's handle is now the only one: closing it reaches the peer as FIN.
  EXPECT_EQ(target.ask("close"), "closed");
  EXPECT_EQ(receive(pair.client.get(), 1), "<eof>");
}

TEST(WindowsGrant, S5_MoveNotRedeemedReturnsTheSocket) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.move(std::move(pair.server), Target::pid(target.pid()),
                                      {.ttl = std::chrono::milliseconds(1)});
  ASSERT_EQ(log.wait(0), GrantOutcome::expired);
  SocketHandle back = log.take_returned(0);
  ASSERT_TRUE(back.valid());
  send_all(back.get(), "back");
  EXPECT_EQ(receive(pair.client.get(), 4), "back");
  EXPECT_EQ(target.ask("redeem " + info.format()).rfind("error refused", 0), 0U);
}

TEST(WindowsGrant, S1_AnotherProcessPresentingTheTextIsRefusedByTheSource) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  Child intruder = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  const std::string answer = intruder.ask("redeem " + info.format());
  EXPECT_EQ(answer.rfind("error refused", 0), 0U) << answer;
  EXPECT_NE(answer.find("bound to pid " + std::to_string(target.pid())), std::string::npos) << answer;
  EXPECT_EQ(log.wait(0), GrantOutcome::refused);
  EXPECT_EQ(grants.stats().refused, 1U);
  // A stolen text burns the grant: single use holds against the target too.
  const std::string late = target.ask("redeem " + info.format());
  EXPECT_NE(late.find("no such grant"), std::string::npos) << late;
  EXPECT_EQ(intruder.ask("recv 1").rfind("got", 0), 0U);  // it holds no socket
}

TEST(WindowsGrant, S2_TextTravelsThroughFileArgvAndEnvironment) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));

  // argv and environment: the text arrives intact through a command line and an
  // environment block (Windows needs the pid before those exist, so a separate process
  // echoes them; see docs/WINDOWS.md).
  Child echo = Child::helper("echo_info", {info.format()}, {"SOCKSHARE_INFO=" + info.format()});
  EXPECT_EQ(echo.receive(), info.format() + " " + info.format());
  EXPECT_EQ(echo.wait_exit(), 0U);

  char dir[MAX_PATH] = {};
  ASSERT_GT(::GetTempPathA(MAX_PATH, dir), 0U);
  const std::string path = std::string(dir) + "sockshare-info-" + std::to_string(::GetCurrentProcessId()) + ".txt";
  {
    std::ofstream file(path);
    file << info.format() << "\r\n";
  }
  EXPECT_EQ(target.ask("redeem-file " + path), "ok");
  std::remove(path.c_str());
  EXPECT_EQ(log.wait(0), GrantOutcome::redeemed) << log.detail(0);
  send_all(pair.client.get(), "file");
  EXPECT_EQ(target.ask("recv 4"), "got file");
}

TEST(WindowsGrant, S7_SocketOptionsAreSharedAcrossProcesses) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  const SOCKET mine = pair.server.get();

  EXPECT_EQ(target.ask("setopt keepalive 1"), "set");
  EXPECT_EQ(get_int_option(mine, SOL_SOCKET, SO_KEEPALIVE), 1);
  ASSERT_TRUE(set_int_option(mine, SOL_SOCKET, SO_KEEPALIVE, 0));
  EXPECT_EQ(target.ask("getopt keepalive"), "0");

  ASSERT_TRUE(set_int_option(mine, IPPROTO_TCP, TCP_NODELAY, 1));
  EXPECT_EQ(target.ask("getopt nodelay"), "1");
  EXPECT_EQ(target.ask("setopt nodelay 0"), "set");
  EXPECT_EQ(get_int_option(mine, IPPROTO_TCP, TCP_NODELAY), 0);

  const int before = get_int_option(mine, SOL_SOCKET, SO_RCVBUF);
  const int wanted = before == 48 * 1024 ? 96 * 1024 : 48 * 1024;
  EXPECT_EQ(target.ask("setopt rcvbuf " + std::to_string(wanted)), "set");
  const int after = get_int_option(mine, SOL_SOCKET, SO_RCVBUF);
  EXPECT_NE(after, before);
  EXPECT_EQ(target.ask("getopt rcvbuf"), std::to_string(after));
}

TEST(WindowsGrant, S8_NoFinUntilTheLastHolderCloses) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  ASSERT_EQ(log.wait(0), GrantOutcome::redeemed);  // the grant's own copy is closed by now
  pair.server.reset();
  // Had the source's close sent FIN, nothing could follow it on the stream.
  EXPECT_EQ(target.ask("send still-open"), "sent");
  EXPECT_EQ(receive(pair.client.get(), 10), "still-open");
  EXPECT_EQ(target.ask("close"), "closed");
  EXPECT_EQ(receive(pair.client.get(), 1), "<eof>");
}

// Platform behaviour, not sockshare's: documents the S9 limit (docs/WINDOWS.md). Run here
// under Wine, which follows Microsoft's documentation on this point.
TEST(WindowsGrant, S9_WineSpecific_EventSelectLastRegistrationWins) {
  TcpPair pair = tcp_pair();
  GrantServer grants;
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  HANDLE mine = ::CreateEventW(nullptr, TRUE, FALSE, nullptr);
  ASSERT_NE(mine, nullptr);
  ASSERT_EQ(::WSAEventSelect(pair.server.get(), mine, FD_READ), 0);
  ASSERT_EQ(target.ask("eventselect-read"), "registered");  // cancels ours
  send_all(pair.client.get(), "x");
  EXPECT_EQ(target.ask("wait-event 10000"), "signaled");
  // Had both registrations stood, the same arrival would have signalled ours too.
  EXPECT_EQ(::WaitForSingleObject(mine, 0), static_cast<DWORD>(WAIT_TIMEOUT));
  ::WSAEventSelect(pair.server.get(), nullptr, 0);
  ::CloseHandle(mine);
}

TEST(WindowsGrant, R19_ReplayIsRefused) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  ASSERT_EQ(target.ask("redeem " + info.format()), "ok");
  const std::string again = target.ask("redeem " + info.format());
  EXPECT_EQ(again.rfind("error refused", 0), 0U) << again;
  EXPECT_NE(again.find("no such grant"), std::string::npos) << again;
  EXPECT_EQ(grants.stats().redeemed, 1U);
}

TEST(WindowsGrant, R19_ExpiredIsRefused) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()),
                                           {.ttl = std::chrono::milliseconds(1)});
  ASSERT_EQ(log.wait(0), GrantOutcome::expired);
  EXPECT_EQ(grants.stats().expired, 1U);
  const std::string answer = target.ask("redeem " + info.format());
  EXPECT_EQ(answer.rfind("error refused", 0), 0U) << answer;
}

TEST(WindowsGrant, R19_RevokedIsRefused) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  SocketHandle held = grants.revoke(info);
  ASSERT_TRUE(held.valid());
  EXPECT_FALSE(grants.revoke(info).valid());
  const std::string answer = target.ask("redeem " + info.format());
  EXPECT_EQ(answer.rfind("error refused", 0), 0U) << answer;
  EXPECT_EQ(log.size(), 0U);  // revoke() reports nothing
  // What revoke returned is a handle for the same socket.
  send_all(held.get(), "held");
  EXPECT_EQ(receive(pair.client.get(), 4), "held");
}

TEST(WindowsGrant, R19_TargetExitEndsTheGrant) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  EXPECT_EQ(grants.stats().pending, 1U);
  target.send("exit");
  EXPECT_EQ(target.wait_exit(), 0U);
  EXPECT_EQ(log.wait(0), GrantOutcome::target_exited);
  EXPECT_EQ(grants.stats().pending, 0U);
  EXPECT_FALSE(grants.revoke(info).valid());
}

TEST(WindowsGrant, ConcurrentRedemptionsAreServedOneAfterAnother) {
  TcpPair first = tcp_pair();
  TcpPair second = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child a = start_redeemer();
  Child b = start_redeemer();
  const SocketInfo for_a = grants.duplicate(first.server.borrow(), Target::pid(a.pid()));
  const SocketInfo for_b = grants.duplicate(second.server.borrow(), Target::pid(b.pid()));
  a.send("redeem " + for_a.format());
  b.send("redeem " + for_b.format());
  EXPECT_EQ(a.receive(), "ok");
  EXPECT_EQ(b.receive(), "ok");
  EXPECT_EQ(log.wait(1), GrantOutcome::redeemed);
  EXPECT_EQ(grants.stats().redeemed, 2U);
  send_all(first.client.get(), "to-a");
  send_all(second.client.get(), "to-b");
  EXPECT_EQ(a.ask("recv 4"), "got to-a");
  EXPECT_EQ(b.ask("recv 4"), "got to-b");
}

TEST(WindowsGrant, R19_SilentRedeemerIsDroppedAtItsDeadline) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServerOptions options = log.options();
  options.session_timeout = std::chrono::milliseconds(300);
  GrantServer grants(options);
  Child silent = start_redeemer();
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  ASSERT_EQ(silent.ask("hold-pipe " + grants.endpoint()), "holding");
  // The target waits for the pipe while the silent one holds it, then is served.
  EXPECT_EQ(target.ask("redeem " + info.format()), "ok");
  EXPECT_EQ(log.wait(0), GrantOutcome::redeemed);
}

TEST(WindowsGrant, GarbageAndForgedTextsAreRefused) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  std::string text = info.format();

  EXPECT_EQ(target.ask("redeem garbage").rfind("error invalid input", 0), 0U);
  std::string damaged = text;
  damaged[40] = damaged[40] == 'A' ? 'B' : 'A';
  EXPECT_EQ(target.ask("redeem " + damaged).rfind("error invalid input", 0), 0U);
  EXPECT_EQ(target.ask("redeem " + text.substr(0, 100)).rfind("error invalid input", 0), 0U);

  SocketInfo linux_style = info;
  linux_style.endpoint.fill('\0');
  linux_style.endpoint[0] = '@';
  linux_style.endpoint[1] = 'x';
  EXPECT_EQ(target.ask("redeem " + linux_style.format()).rfind("error invalid input", 0), 0U);

  // A well-formed text with a guessed token: the source knows no such grant, and the real
  // one is untouched.
  SocketInfo forged = info;
  forged.token[0] ^= 1;
  const std::string answer = target.ask("redeem " + forged.format());
  EXPECT_NE(answer.find("no such grant"), std::string::npos) << answer;
  EXPECT_EQ(grants.stats().pending, 1U);
  EXPECT_EQ(target.ask("redeem " + text), "ok");
}

TEST(WindowsGrant, R17_R18_PipeServedByAnotherProcessGetsNoToken) {
  TcpPair pair = tcp_pair();
  EventLog log;
  GrantServer grants(log.options());
  Child target = start_redeemer();
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::pid(target.pid()));
  SocketInfo wrong_source = info;
  wrong_source.source_pid = static_cast<std::int32_t>(target.pid());
  const std::string answer = target.ask("redeem " + wrong_source.format());
  EXPECT_NE(answer.find("squatter"), std::string::npos) << answer;
  // The right pid with another creation time: a pid now naming another process.
  SocketInfo other_process = info;
  other_process.source_inode ^= 1;
  const std::string reused = target.ask("redeem " + other_process.format());
  EXPECT_NE(reused.find("creation time differs"), std::string::npos) << reused;
  EXPECT_EQ(grants.stats().pending, 1U);  // the token was never presented
  EXPECT_EQ(target.ask("redeem " + info.format()), "ok");
}

TEST(WindowsGrant, SelfGrantRedeemsInProcess) {
  TcpPair pair = tcp_pair();
  GrantServer grants;
  const SocketInfo info = grants.duplicate(pair.server.borrow(), Target::self());
  SocketHandle copy = redeem(SocketInfo::parse(info.format()));
  ASSERT_TRUE(copy.valid());
  EXPECT_NE(copy.get(), pair.server.get());
  send_all(copy.get(), "self");
  EXPECT_EQ(receive(pair.client.get(), 4), "self");
}

TEST(WindowsGrant, DuplicateChecksItsArguments) {
  GrantServer grants;
  TcpPair pair = tcp_pair();
  try {
    (void)grants.duplicate(BorrowedSocket(static_cast<SOCKET>(0x7ff0)), Target::self());
    ADD_FAILURE() << "a non-socket was granted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_input) << e.what();
  }
  Child gone = start_redeemer();
  const DWORD pid = gone.pid();
  gone.send("exit");
  EXPECT_EQ(gone.wait_exit(), 0U);
  gone = Child();
  try {
    (void)grants.duplicate(pair.server.borrow(), Target::pid(pid));
    ADD_FAILURE() << "granted to an exited process";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::refused) << e.what();
  }
  GrantServerOptions small;
  small.max_grants_per_target = 1;
  GrantServer limited(small);
  (void)limited.duplicate(pair.server.borrow(), Target::self());
  try {
    (void)limited.duplicate(pair.server.borrow(), Target::self());
    ADD_FAILURE() << "the per-target quota was not enforced";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::overloaded) << e.what();
  }
}

TEST(WindowsGrant, SourceGoneIsPeerGone) {
  TcpPair pair = tcp_pair();
  SocketInfo info;
  {
    GrantServer grants;
    info = grants.duplicate(pair.server.borrow(), Target::self());
  }
  try {
    (void)redeem(info, {.timeout = 2s});
    ADD_FAILURE() << "redeemed from a server that is gone";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::peer_gone) << e.what();
  }
}

}  // namespace
}  // namespace sockshare::windows
