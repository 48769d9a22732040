// Duplicate and redeem on Windows: the same contract and shape as <sockshare/grant.hpp> on
// Linux, on WSADuplicateSocketW / WSASocketW(FROM_PROTOCOL_INFO). docs/WINDOWS.md is the guide.
//
// The SocketInfo envelope is the Linux one (same layout, same text form). What differs:
// the endpoint is a local named pipe "\\.\pipe\sockshare-<pid>-<random>", and the
// WSAPROTOCOL_INFOW is never in the info: the source calls WSADuplicateSocketW only after it
// has checked, on its pipe, that the process presenting the token is the target. So a
// copied info is useless to anyone else, and used once it is gone, although Windows itself
// enforces neither (and Wine's WSASocketW checks nothing at all).
//
// Thread safety: every public GrantServer method may be called from any thread at any time.
// redeem() is reentrant. A SOCKET needs no duplication to be shared by threads (S4).
#pragma once

#include <winsock2.h>
#include <windows.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "sockshare/grant.hpp"
#include "sockshare/windows/socket_handle.hpp"

namespace sockshare::windows {

// The process a grant is for, by process id. duplicate() opens the process at once and
// holds that handle until the grant ends, which keeps Windows from reusing the id meanwhile;
// the usual caveat applies between learning the id and calling duplicate().
class Target {
 public:
  [[nodiscard]] static Target pid(DWORD pid) { return Target(pid); }
  [[nodiscard]] static Target self() { return Target(::GetCurrentProcessId()); }
  [[nodiscard]] DWORD pid_value() const noexcept { return pid_; }

 private:
  explicit Target(DWORD pid) : pid_(pid) {}
  DWORD pid_;
};

struct GrantOptions {
  std::chrono::milliseconds ttl{5000};  // the grant expires this long after duplicate()
};

// Reported once per grant when it leaves the server. For a move grant that was not
// redeemed, `returned` holds the source's socket; if the callback leaves it there it is closed.
struct GrantEvent {
  SocketInfo info;
  GrantOutcome outcome = GrantOutcome::redeemed;
  std::string detail{};
  SocketHandle returned{};
};

struct GrantServerOptions {
  std::size_t max_grants = 1024;
  std::size_t max_grants_per_target = 64;
  // From a redeemer's connection to its acknowledgement. Redemptions are served one at a
  // time on the server's thread; others wait in WaitNamedPipe meanwhile.
  std::chrono::milliseconds session_timeout{2000};
  // Called without internal locks held, from the server's thread (or from the destructor
  // for grants still pending then).
  std::function<void(GrantEvent&)> on_event{};
};

struct GrantServerStats {
  std::uint64_t redeemed = 0;
  std::uint64_t refused = 0;
  std::uint64_t expired = 0;
  std::uint64_t target_exited = 0;
  std::uint64_t failed = 0;
  std::size_t pending = 0;      // grants not yet presented
  std::size_t in_progress = 0;  // redemptions waiting for their acknowledgement
};

class GrantServer {
 public:
  // Creates the named pipe (as its first instance, so a name squatted by another process
  // fails here) and serves it on a background thread.
  explicit GrantServer(GrantServerOptions options = {});
  ~GrantServer();  // stops serving; pending grants are reported `revoked`
  GrantServer(const GrantServer&) = delete;
  GrantServer& operator=(const GrantServer&) = delete;

  // Share: the grant holds its own duplicate of `socket`; the caller keeps theirs.
  // Throws overloaded (table or target quota full), refused (no such process, or it has
  // exited), invalid_input (not a socket).
  [[nodiscard]] SocketInfo duplicate(BorrowedSocket socket, const Target& target,
                                     const GrantOptions& options = {});
  // Move: takes the caller's socket; it is closed once the target has acknowledged receipt.
  // If the grant fails, GrantEvent::returned gives it back; if move() throws, `socket` is
  // untouched.
  [[nodiscard]] SocketInfo move(SocketHandle&& socket, const Target& target,
                                const GrantOptions& options = {});
  // Takes back a grant not yet presented: the socket it held, or an empty handle if the
  // grant is unknown, already presented, expired or revoked. No GrantEvent is reported.
  SocketHandle revoke(const SocketInfo& info);

  // The pipe name redeemers connect to ("\\.\pipe\sockshare-<pid>-<random>").
  [[nodiscard]] const std::string& endpoint() const noexcept;
  [[nodiscard]] GrantServerStats stats() const;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

struct RedeemOptions {
  std::chrono::milliseconds timeout{5000};
};

// The WSASocketW(FROM_PROTOCOL_INFO) of sockshare: connects to the source's pipe, checks
// that the pipe is served by the source process (a squatter is refused before the token is
// sent), presents the token, receives the WSAPROTOCOL_INFOW the source made for this
// process, opens the socket (overlapped, not inheritable), checks its family, type and
// protocol against the info and acknowledges. Throws Error: refused (not the target, wrong
// source, grant unknown, used, expired or revoked), peer_gone (the source no longer serves
// grants), protocol (what arrived is not what the info describes), timed_out.
[[nodiscard]] SocketHandle redeem(const SocketInfo& info, const RedeemOptions& options = {});

// Reads an info text from environment variable `name` (the Linux helper of the same name
// also reads a pipe descriptor; on Windows pass a pipe's text to SocketInfo::parse).
[[nodiscard]] SocketInfo inherited_info(std::string_view name = "SOCKSHARE_INFO");

}  // namespace sockshare::windows
