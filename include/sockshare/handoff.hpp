// Zero-downtime handoff of listeners between generations of a server.
//
// The running generation (the holder) registers its listeners with a HandoffServer bound to
// a control address. A new generation (the taker) connects, both sides check each other's
// identity, the holder sends every listener (named, with metadata) in batches of at most 253
// descriptors, the taker validates them and acknowledges, and only then does the holder stop
// accepting. The listening sockets themselves travel, so connections already waiting in
// their accept queues are served by whoever accepts next: nothing is dropped. A taker that
// fails, dies or never acknowledges leaves the holder serving as before.
//
// The control listener travels too (unless disabled), so the next generation answers the
// next handoff at the same address: back-to-back upgrades need no new path and no unlink.
// docs/HANDOFF.md describes the protocol (message types 0x8380-0x838F) and the guarantees.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sockshare/channel.hpp"
#include "sockshare/error.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/wire.hpp"

namespace sockshare::handoff {

// ---------------------------------------------------------------------------------------
// Wire vocabulary (docs/HANDOFF.md, "Protocol"). A sub-range of the control range 0x83xx.

inline constexpr std::uint16_t kTypeFirst = wire::kTypeControlBase + 0x80;  // 0x8380
inline constexpr std::uint16_t kTypeHello = kTypeFirst + 0;      // taker -> holder
inline constexpr std::uint16_t kTypeListeners = kTypeFirst + 1;  // holder -> taker, fds
inline constexpr std::uint16_t kTypeAck = kTypeFirst + 2;        // taker -> holder
inline constexpr std::uint16_t kTypeAbort = kTypeFirst + 3;      // taker -> holder
inline constexpr std::uint16_t kTypeRefused = kTypeFirst + 4;    // holder -> taker
inline constexpr std::uint16_t kTypeReleased = kTypeFirst + 5;   // holder -> taker
inline constexpr std::uint16_t kTypeLast = kTypeFirst + 0x0F;    // 0x838F, rest reserved
inline constexpr std::uint16_t kProtocolVersion = 1;
// More listeners than this in one generation is refused: it bounds what a taker accepts.
inline constexpr std::uint32_t kMaxListeners = 65536;
inline constexpr std::size_t kMaxReasonLength = 1024;
inline constexpr std::size_t kMaxEndpointLength = 512;

// Why a handoff was refused or abandoned (u16 on the wire).
enum class Reason : std::uint16_t {
  busy = 1,                 // another taker is being served (one upgrade at a time)
  identity = 2,             // wrong uid, or not the expected process
  version = 3,              // protocol version not spoken
  already_handed_over = 4,  // this holder gave its listeners away already
  protocol = 5,             // malformed or unexpected message
  rejected = 6,             // the taker did not accept what it received
};
[[nodiscard]] std::string_view to_string(Reason reason) noexcept;

// What the holder says about each descriptor (the channel's per-descriptor metadata).
struct ListenerMeta {
  std::string name;      // unique in the generation; a valid LISTEN_FDNAMES entry
  std::string endpoint;  // local address as text ("127.0.0.1:8080", "unix:/run/a.sock")
  int family = 0;        // AF_INET, AF_INET6, AF_UNIX
  int type = 0;          // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
  int protocol = 0;
  std::uint64_t cookie = 0;  // SO_COOKIE: the same socket in both processes
  bool control = false;      // the holder's own control listener, not an application's
};

// Encodes one metadata entry. Throws invalid_input for a bad name or an oversized endpoint.
[[nodiscard]] std::vector<std::byte> encode_meta(const ListenerMeta& meta);
// Strict decoder (fuzzed): exact length, version 1, no unknown flags, valid name.
wire::DecodeResult decode_meta(std::span<const std::byte> bytes, ListenerMeta& out);

// Fixed-size payloads, all little-endian; decoders reject any other size or non-zero
// reserved fields.
struct Hello {
  std::uint16_t version = kProtocolVersion;
};
struct Batch {
  std::uint32_t first_index = 0;  // index of this message's first descriptor in the set
  std::uint32_t total = 0;        // descriptors in the whole set (all batches)
};
struct Ack {
  std::uint32_t count = 0;  // descriptors received and accepted
};
struct Refusal {
  Reason reason = Reason::protocol;
  std::string text;
};
[[nodiscard]] std::vector<std::byte> encode(const Hello& hello);
[[nodiscard]] std::vector<std::byte> encode(const Batch& batch);
[[nodiscard]] std::vector<std::byte> encode(const Ack& ack);
[[nodiscard]] std::vector<std::byte> encode(const Refusal& refusal);
wire::DecodeResult decode(std::span<const std::byte> bytes, Hello& out);
wire::DecodeResult decode(std::span<const std::byte> bytes, Batch& out);
wire::DecodeResult decode(std::span<const std::byte> bytes, Ack& out);
wire::DecodeResult decode(std::span<const std::byte> bytes, Refusal& out);

// ---------------------------------------------------------------------------------------
// Holder side.

// Who may take over, and how long the holder waits for it.
struct PeerCheck {
  // Only this process (checked through its pidfd where the kernel has SO_PEERPIDFD, R17).
  std::optional<pid_t> pid;
  // Stronger: only the process behind this pidfd (pidfs inode comparison, Linux 6.9+).
  BorrowedFd pidfd;
};

struct HandoffServerOptions {
  PeerCheck taker;  // beyond the always-enforced same-uid check (SO_PEERCRED)
  // From accepting the taker to its hello, and from the last batch to its ack. A taker that
  // misses either is dropped and the holder keeps serving (haproxy #1883).
  std::chrono::milliseconds exchange_timeout{10000};
  // Pass the control listener along, so the next generation serves the next handoff at
  // the same address.
  bool hand_over_control = true;
  // For a unix:/path control address: refuse to serve unless the directory holding it is
  // owned by this user and closed to everyone else (mode 0700), because socket file
  // permissions alone are not honoured everywhere and the directory is what keeps others
  // from replacing the file (R18).
  bool require_private_directory = true;
  // Removes the socket files of the control address and of registered unix:/path listeners
  // when the server is destroyed without having handed over, each only if the path still
  // holds the file seen at registration. After a handoff nothing is ever removed: the next
  // generation serves on those very paths.
  bool remove_paths_on_exit = true;
  // Called once the taker has acknowledged, before the holder confirms the release: stop
  // accepting here (and serve what was already accepted). Runs on the serve() thread.
  std::function<void()> on_handed_over;
};

enum class ServeResult {
  idle,         // no taker arrived within the wait
  handed_over,  // the taker acknowledged: stop accepting (on_handed_over already ran)
  failed,       // the taker vanished, timed out, aborted or misbehaved; keep serving
  refused,      // the taker failed the identity or version check; keep serving
};
[[nodiscard]] std::string_view to_string(ServeResult result) noexcept;

struct ServeOutcome {
  ServeResult result = ServeResult::idle;
  std::string detail;                // why, for failed and refused
  pid_t taker_pid = 0;               // as SO_PEERCRED reported it
  std::size_t descriptors_sent = 0;  // including the control listener
  std::size_t concurrent_refused = 0;  // other takers turned away meanwhile (Reason::busy)
  std::chrono::microseconds duration{0};  // accept of the taker to its ack
};

class HandoffServer {
public:
  HandoffServer() = default;
  // Binds the control address (unix:/path in a private directory, or unix:@name). A stale
  // socket file nobody answers on is replaced; a live one is an error (EADDRINUSE).
  [[nodiscard]] static HandoffServer listen(const Endpoint& control,
                                            HandoffServerOptions options = {});
  // Serves on a control listener handed over by the previous generation
  // (Takeover::control). Throws invalid_input if it is not a listening unix seqpacket socket.
  [[nodiscard]] static HandoffServer adopt(Fd control_listener, HandoffServerOptions options = {});
  HandoffServer(HandoffServer&&) noexcept;
  HandoffServer& operator=(HandoffServer&&) noexcept;
  HandoffServer(const HandoffServer&) = delete;
  HandoffServer& operator=(const HandoffServer&) = delete;
  ~HandoffServer();

  // Registers a listener to hand over. The caller keeps ownership and must keep it open
  // while the server may serve. Names must be unique and valid LISTEN_FDNAMES entries.
  void add(std::string name, BorrowedFd listener);
  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }

  // POLLIN here means a taker is waiting: call serve(0ms).
  [[nodiscard]] BorrowedFd native_handle() const noexcept { return control_.borrow(); }
  [[nodiscard]] const Endpoint& endpoint() const noexcept { return endpoint_; }
  [[nodiscard]] bool handed_over() const noexcept { return handed_over_; }

  // Waits up to `wait` for a taker and runs one complete handoff with it. Takers that
  // arrive meanwhile are refused (Reason::busy). Blocks for at most wait + 2 exchange
  // timeouts. Throws invalid_input once handed over; errors on the control listener
  // itself are thrown, everything a taker does wrong is an outcome.
  ServeOutcome serve(std::chrono::milliseconds wait = kForever);

private:
  struct Entry {
    BorrowedFd fd;
    ListenerMeta meta;
    std::string path;        // unix:/path listeners: the file to remove on exit
    std::uint64_t path_inode = 0;
  };
  ServeOutcome serve_taker(Channel& taker, pid_t taker_pid);
  void refuse(Channel& channel, Reason reason, const std::string& text) noexcept;
  void remove_paths() noexcept;

  Fd control_;
  Endpoint endpoint_;
  HandoffServerOptions options_;
  std::vector<Entry> entries_;
  std::string control_path_;
  std::uint64_t control_inode_ = 0;
  bool handed_over_ = false;
};

// ---------------------------------------------------------------------------------------
// Taker side.

struct TakeOptions {
  PeerCheck holder;  // beyond the always-enforced same-uid check
  std::chrono::milliseconds timeout{10000};  // connect, and each message of the exchange
};

struct TakenListener {
  Fd fd;  // close-on-exec, the very socket the holder listened on
  ListenerMeta meta;
  SocketIdentity identity;
};

struct Takeover {
  std::vector<TakenListener> listeners;  // application listeners, in the holder's order
  Fd control;  // the holder's control listener (invalid if it did not pass it)
  pid_t holder_pid = 0;
  bool released = false;  // the holder confirmed it stopped accepting
};

// The two-phase taker: receive() the listeners, prepare (bind extra sockets, load
// configuration, start workers), then commit() to make the holder stop accepting, or
// abort() (or destroy the client) to leave it serving.
class HandoffClient {
public:
  // Connects, checks the holder's identity (uid, and PeerCheck) and says hello. Throws
  // refused for an identity mismatch, timed_out, or the connect error.
  [[nodiscard]] static HandoffClient connect(const Endpoint& control, TakeOptions options = {});
  HandoffClient(HandoffClient&&) noexcept = default;
  HandoffClient& operator=(HandoffClient&&) noexcept = default;
  ~HandoffClient();

  [[nodiscard]] pid_t holder_pid() const noexcept { return holder_pid_; }

  // Receives every batch and validates each descriptor against its metadata (kind, cookie,
  // listening). Throws refused with the holder's reason (e.g. busy), protocol for a bad
  // set (after telling the holder, which keeps serving), timed_out, peer_gone.
  [[nodiscard]] Takeover receive();
  // Acknowledges: the holder stops accepting. Returns whether it confirmed that within the
  // timeout (false also when it died first); the listeners are this generation's either
  // way. Throws timed_out if the ack cannot even be queued.
  bool commit();
  // Tells the holder this generation will not take over. Never throws.
  void abort(std::string_view reason) noexcept;

private:
  HandoffClient() = default;
  Channel channel_;
  TakeOptions options_;
  pid_t holder_pid_ = 0;
  std::uint32_t received_ = 0;
  bool received_all_ = false;
  bool finished_ = false;
};

// connect() + receive() + commit() in one call.
[[nodiscard]] Takeover take_listeners(const Endpoint& control, TakeOptions options = {});

}  // namespace sockshare::handoff
