// Duplicate and redeem: the WSADuplicateSocket contract on Linux.
//
// A source process calls GrantServer::duplicate(socket, target) and gets a SocketInfo bound
// to one target process. The info travels by any IPC (its text form fits argv, an environment
// variable or a file); the target calls redeem(info) and gets its own descriptor for the same
// underlying socket. Redemption speaks typed messages over a Channel to the source's grant
// endpoint; both ends check the other's pidfd identity. A share grant made with
// GrantOptions::direct can also be redeemed with no message to the source at all
// (RedeemOptions::direct: pidfd_getfd on a number carried in the info), with weaker
// guarantees that docs/GRANTS.md spells out. docs/GRANTS.md is the user guide.
//
// Thread safety: every public GrantServer method may be called from any thread at any time.
// SocketInfo is a plain value. redeem() is reentrant (each call has its own connection).
// A descriptor itself needs no duplication to be shared by threads of one process (S4).
#pragma once

#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"

namespace sockshare {

enum class ShareMode : std::uint8_t {
  share = 0,  // the source keeps its descriptor; both use the socket (S5)
  move = 1,   // the source's copy is closed once the target has acknowledged receipt
};

// What a target needs to redeem a grant, and what it will get. Fixed size, trivially
// copyable, versioned; to_bytes()/from_bytes() give the stable little-endian layout and
// format()/parse() the printable form "sockshare1:<base64url of the bytes + CRC-32>".
struct SocketInfo {
  static constexpr std::uint16_t kVersion = 1;
  static constexpr std::size_t kEndpointSize = 108;    // sockaddr_un::sun_path
  static constexpr std::size_t kBinarySize = 200;      // including the trailing CRC-32
  static constexpr std::size_t kTextSize = 11 + 267;   // "sockshare1:" + base64url, no padding
  static constexpr std::uint8_t kFlagFastPath = 0x01;  // the source offers pidfd_getfd
  // The source offers direct redemption: source_fd names the duplicate it holds, and the
  // target may take it with pidfd_getfd without contacting the source (share mode only).
  static constexpr std::uint8_t kFlagDirect = 0x02;
  static constexpr std::uint8_t kKnownFlags = kFlagFastPath | kFlagDirect;

  std::uint16_t version = kVersion;
  ShareMode mode = ShareMode::share;
  std::uint8_t flags = 0;
  // The socket, as SO_DOMAIN / SO_TYPE / SO_PROTOCOL / SO_COOKIE report it.
  std::int32_t family = 0;
  std::int32_t type = 0;
  std::int32_t protocol = 0;
  std::uint64_t cookie = 0;
  // With kFlagDirect: the number of the duplicate the source holds for this grant until it
  // expires or is revoked; -1 otherwise (the parser insists on exactly that).
  std::int32_t source_fd = -1;
  // The source (who serves the grant) and the target (who alone may redeem it). The inode
  // is the process's pidfs inode (Linux 6.9+), unique for the boot; 0 where unavailable,
  // in which case identity falls back to pid + uid (R17, documented).
  std::int32_t source_pid = 0;
  std::uint32_t source_uid = 0;
  std::uint64_t source_inode = 0;
  std::int32_t target_pid = 0;
  std::uint32_t target_uid = 0;
  std::uint64_t target_inode = 0;
  std::uint64_t expires_ns = 0;          // CLOCK_MONOTONIC nanoseconds (same clock machine-wide)
  std::array<std::uint8_t, 16> token{};  // from getrandom; presented once
  // The grant endpoint: "@abstract-name" or "/path/to/socket", NUL-padded.
  std::array<char, kEndpointSize> endpoint{};

  [[nodiscard]] std::string endpoint_text() const;
  [[nodiscard]] Endpoint grant_endpoint() const;
  // "tcp4 stream for pid 4711 (share, expires in 4.2 s)": for logs, never for parsing.
  [[nodiscard]] std::string describe() const;

  [[nodiscard]] std::array<std::byte, kBinarySize> to_bytes() const;
  // Throws Error(invalid_input) naming the problem: wrong size, magic, version, checksum,
  // unknown flags or mode, malformed endpoint.
  [[nodiscard]] static SocketInfo from_bytes(std::span<const std::byte> bytes);

  [[nodiscard]] std::string format() const;
  // Accepts exactly what format() produces (surrounding ASCII whitespace is ignored, so a
  // line read from a file or pipe parses as is). Throws Error(invalid_input) naming the
  // problem: missing prefix, other version, bad length or character, bad checksum, ...
  [[nodiscard]] static SocketInfo parse(std::string_view text);

  friend bool operator==(const SocketInfo&, const SocketInfo&) = default;
};
static_assert(std::is_trivially_copyable_v<SocketInfo>);

#ifndef _WIN32  // the Windows backend has its own: <sockshare/windows/grant.hpp>
// The process a grant is for. A pidfd names it race-free; a bare pid is resolved to a pidfd
// immediately (the usual pid caveat applies between learning the pid and this call).
class Target {
 public:
  [[nodiscard]] static Target pid(pid_t pid) { return Target(pid, BorrowedFd()); }
  [[nodiscard]] static Target pidfd(BorrowedFd pidfd) { return Target(0, pidfd); }
  [[nodiscard]] static Target self();
  [[nodiscard]] pid_t pid_value() const noexcept { return pid_; }
  [[nodiscard]] BorrowedFd pidfd_value() const noexcept { return pidfd_; }

 private:
  Target(pid_t pid, BorrowedFd pidfd) : pid_(pid), pidfd_(pidfd) {}
  pid_t pid_;
  BorrowedFd pidfd_;
};

struct GrantOptions {
  std::chrono::milliseconds ttl{5000};  // the grant expires this long after duplicate()
  // Offer direct redemption (share only; move() refuses it, a move needs the ack): the info
  // carries the number of the duplicate the source holds, and the target may take it with
  // pidfd_getfd without a round trip. The source cannot see such a redemption, so it keeps
  // the duplicate until the ttl, revoke() or the target's exit, and then reports `lapsed`:
  // keep the ttl short. Single use is not enforced against the target (docs/GRANTS.md).
  // Ignored (no kFlagDirect) when the kernel reports no socket cookie to check.
  bool direct = false;
};

#endif  // _WIN32

enum class GrantOutcome : std::uint8_t {
  redeemed,       // the target acknowledged receipt
  refused,        // presented by the wrong process: the grant is gone (single use)
  expired,        // nobody redeemed it in time
  revoked,        // the GrantServer was destroyed first (revoke() itself reports nothing)
  target_exited,  // the target died before redeeming it
  failed,         // the redeemer disconnected, timed out or rejected what it got
  lapsed,         // a direct grant reached its expiry: the target may have taken it directly
                  // (invisible to the source) or not at all
};
[[nodiscard]] std::string_view to_string(GrantOutcome outcome) noexcept;

#ifndef _WIN32
// Reported once per grant when it leaves the server. For a move grant that was not
// redeemed, `returned` holds the source's descriptor so nothing is lost silently; if the
// callback leaves it there it is closed.
struct GrantEvent {
  SocketInfo info;
  GrantOutcome outcome = GrantOutcome::redeemed;
  std::string detail{};
  Fd returned{};
};

struct GrantServerOptions {
  // Where redeemers connect. Default: a fresh abstract name "@sockshare-<pid>-<random>".
  // A unix path should live in a 0700 directory (R18); the socket file is created 0600.
  std::optional<Endpoint> endpoint{};
  // Serve on a background thread. When false, poll native_handle() for POLLIN and call
  // process_events() from your own event loop.
  bool background_thread = true;
  std::size_t max_grants = 1024;
  std::size_t max_grants_per_target = 64;
  std::size_t max_sessions = 64;                    // redemptions in progress at once
  std::chrono::milliseconds session_timeout{2000};  // from connect to acknowledgement
  bool offer_fast_path = true;  // answer pidfd_getfd requests with the descriptor number
  // Called without internal locks held, from the thread that processes events.
  std::function<void(GrantEvent&)> on_event{};
};

struct GrantServerStats {
  std::uint64_t redeemed = 0;
  std::uint64_t refused = 0;
  std::uint64_t expired = 0;
  std::uint64_t target_exited = 0;
  std::uint64_t failed = 0;
  std::uint64_t fast_path = 0;  // redemptions completed through pidfd_getfd
  std::uint64_t lapsed = 0;     // direct grants that reached their expiry (redeemed or not)
  std::size_t pending = 0;      // grants not yet presented
  std::size_t in_progress = 0;  // redemptions waiting for their acknowledgement
};

class GrantServer {
 public:
  explicit GrantServer(GrantServerOptions options = {});
  ~GrantServer();  // stops serving; pending grants are dropped (move grants: see on_event)
  GrantServer(const GrantServer&) = delete;
  GrantServer& operator=(const GrantServer&) = delete;

  // Share: grants `target` a descriptor for `socket`; the caller keeps its own. The server
  // holds a duplicate until the grant is redeemed, refused, expired or revoked.
  // Throws overloaded when the table or the target's quota is full, refused when the target
  // has already exited, invalid_input when `socket` is not a socket.
  [[nodiscard]] SocketInfo duplicate(BorrowedFd socket, const Target& target,
                                     const GrantOptions& options = {});
  // Move: takes the caller's descriptor (`socket` is empty afterwards); this process keeps
  // the socket open until the target acknowledges receipt and closes it then (S5). If the
  // grant fails, GrantEvent::returned gives it back; if move() throws, `socket` is untouched.
  [[nodiscard]] SocketInfo move(Fd&& socket, const Target& target,
                                const GrantOptions& options = {});

  // Takes back a grant not yet presented. Returns the descriptor the grant held (a
  // duplicate for share, the moved socket for move), or nullopt if the grant is unknown,
  // already presented, expired or revoked. No GrantEvent is reported for it. For a direct
  // grant the number named in the info is closed here and the returned descriptor is a
  // fresh duplicate under another number, so a direct redemption can no longer take it. If
  // that duplicate cannot be made (EMFILE), throws overloaded and the grant stays as it was.
  std::optional<Fd> revoke(const SocketInfo& info);

  // Pollable for POLLIN whenever process_events() has work (connections, messages, expiry,
  // a target's exit).
  [[nodiscard]] BorrowedFd native_handle() const noexcept;
  // Handles everything that is ready without blocking; returns the number of events. A
  // failure while handling one event does not stop the others, expiry or the delivery of
  // every GrantEvent collected; the first such failure (or on_event exception) is thrown
  // after that. Connections that cannot be accepted or served are dropped and the listener
  // rests briefly, so a persistent error does not make the handle poll readable again at
  // once.
  std::size_t process_events();

  [[nodiscard]] const Endpoint& endpoint() const noexcept;
  [[nodiscard]] GrantServerStats stats() const;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Pidfds of grant sources kept between direct redemptions, so that repeated redemptions
// from one source cost one pidfd_getfd and one getsockopt. Keyed by the source's pid and
// pidfs inode (pid and uid before pidfs); an entry is dropped when its source turns out to
// have exited, and the oldest when the cache is full. Thread-safe. redeem() uses the
// process-wide one unless RedeemOptions::sources names another.
struct RedeemOptions;

class DirectSourceCache {
 public:
  explicit DirectSourceCache(std::size_t capacity = 16);
  ~DirectSourceCache();
  DirectSourceCache(const DirectSourceCache&) = delete;
  DirectSourceCache& operator=(const DirectSourceCache&) = delete;

  [[nodiscard]] static DirectSourceCache& process();
  void clear();  // closes every cached pidfd
  [[nodiscard]] std::size_t size() const;

  class Impl;

 private:
  friend Fd redeem(const SocketInfo& info, const RedeemOptions& options);
  std::unique_ptr<Impl> impl_;
};

struct RedeemOptions {
  std::chrono::milliseconds timeout{5000};
  // R20: ask for the descriptor number and take it with pidfd_getfd; falls back to
  // SCM_RIGHTS when the kernel refuses (ptrace rules, Yama, seccomp). The socket cookie is
  // checked either way.
  bool fast_path = false;
  // Direct redemption, no round trip: when the info offers it (kFlagDirect), check expiry
  // and that this process is the target locally, open (or reuse) a pidfd for the source and
  // check its identity (R17), pidfd_getfd the number in the info and check the socket's
  // cookie and kind (R20). Anything that prevents it (the kernel refuses pidfd_getfd, the
  // number no longer names the granted socket, the info does not offer it) falls back to
  // the channel redemption above, unless direct_fallback is false: then it throws refused.
  bool direct = false;
  bool direct_fallback = true;
  DirectSourceCache* sources = nullptr;  // nullptr: DirectSourceCache::process()
};

// The WSASocket(FROM_PROTOCOL_INFO) analogue: connects to the source named in `info`,
// checks that it is that source (R18), presents the token, verifies that what arrives is
// the socket described (R15/R20) and acknowledges it. Returns an owned, close-on-exec
// descriptor. Throws Error: refused (not the target, wrong source, grant unknown, used,
// expired or revoked; with direct and no fallback: why pidfd_getfd could not take the
// socket), peer_gone (the source is gone), protocol, timed_out. With options.direct and a
// direct grant it contacts nothing (see RedeemOptions::direct).
// Thread safety: reentrant; DirectSourceCache is internally locked.
[[nodiscard]] Fd redeem(const SocketInfo& info, const RedeemOptions& options = {});

// Reads an info text from environment variable `name`, or, if `name`_FD is set instead (the
// spawn helper's pipe passing), one line from that descriptor, which is made close-on-exec
// first and then closed, and the variable unset. Throws invalid_input when the variable
// names a standard stream (0-2). Reads and changes the environment: call it before starting
// threads that might call setenv.
[[nodiscard]] SocketInfo inherited_info(std::string_view name = "SOCKSHARE_INFO");

#endif  // _WIN32

// The grant protocol on the channel (docs/GRANTS.md). Types live in sockshare's reserved
// range 0x8100-0x81FF. All integers little-endian.
namespace grant_protocol {
inline constexpr std::uint16_t kRedeem = 0x8101;    // token[16], u32 flags (bit 0: fast path)
inline constexpr std::uint16_t kSocket = 0x8102;    // u64 cookie + the descriptor (SCM_RIGHTS)
inline constexpr std::uint16_t kNumber = 0x8103;    // i32 descriptor number, u64 cookie
inline constexpr std::uint16_t kAck = 0x8104;       // empty: received and verified
inline constexpr std::uint16_t kRefused = 0x8105;   // reason text; the server then closes
inline constexpr std::uint16_t kFallback = 0x8106;  // i32 errno of pidfd_getfd: send it instead
inline constexpr std::uint16_t kReject = 0x8107;    // reason text: what arrived was wrong
inline constexpr std::uint32_t kRedeemFastPath = 0x1;
}  // namespace grant_protocol

}  // namespace sockshare
