// The dispatcher (S6): one process owns the listeners and accepts; worker processes receive
// each connection over a Channel, with metadata, and acknowledge it. The dispatcher keeps its
// copy of every connection until the worker's acknowledgement, so a worker that dies or
// breaks its channel first loses nothing: the connection goes to another worker (R12).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sockshare/channel.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"

namespace sockshare::dispatch {

// Message types of the worker protocol (docs/DISPATCH.md), in the range wire.hpp reserves
// for sockshare's own protocols.
inline constexpr std::uint16_t kHello = 0x8201;       // worker -> dispatcher: index, pid
inline constexpr std::uint16_t kConnections = 0x8202; // dispatcher -> worker: 1..253 fds, metadata per fd
inline constexpr std::uint16_t kAck = 0x8203;         // worker -> dispatcher: connection ids received
inline constexpr std::uint16_t kLoad = 0x8204;        // worker -> dispatcher: connections in service
// In a load report: the worker is inside a long piece of work and will not read its channel
// until its next report; the other 31 bits are the connection count.
inline constexpr std::uint32_t kLoadBusyBit = 1U << 31;
inline constexpr std::uint16_t kDrain = 0x8205;       // dispatcher -> worker: finish and exit
inline constexpr std::uint16_t kBye = 0x8206;         // worker -> dispatcher: leaving
// worker -> dispatcher: the descriptors of the kConnections message with this sequence
// number were lost on receipt (MSG_CTRUNC at RLIMIT_NOFILE, R9); send them elsewhere.
inline constexpr std::uint16_t kReject = 0x8207;

// Environment variables through which a spawned worker finds its channel.
inline constexpr const char* kChannelFdEnv = "SOCKSHARE_CHANNEL_FD";
inline constexpr const char* kWorkerIndexEnv = "SOCKSHARE_WORKER_INDEX";

// What travels with each connection.
struct ConnectionInfo {
  std::uint64_t id = 0;          // unique per dispatcher
  std::string listener = {};     // the name the listener was added with
  std::string peer = {};         // peer address as text ("127.0.0.1:50312", "[::1]:4000", "unix")
  std::int64_t accepted_at_ns = 0;  // CLOCK_REALTIME at accept
  std::vector<std::byte> initial_bytes = {};  // bytes the dispatcher already read, if it peeked
};

// A connection as a worker receives it. The socket is non-blocking: the dispatcher accepted
// it with SOCK_NONBLOCK and the flag is shared with its copy (R14); clear it if you want
// blocking I/O. Process info.initial_bytes first: the dispatcher read them from the socket.
struct Connection {
  Fd socket = {};
  ConnectionInfo info = {};
};

// Encoding of ConnectionInfo as per-descriptor metadata; fuzzed. Throws Error(protocol) on
// malformed input.
std::vector<std::byte> encode_connection_info(const ConnectionInfo& info);
// The same into `out`, replacing its contents and reusing its capacity.
void encode_connection_info(const ConnectionInfo& info, std::vector<std::byte>& out);
ConnectionInfo decode_connection_info(std::span<const std::byte> bytes);

// ---- Worker side -------------------------------------------------------------------------

class Worker {
public:
  // Sends hello (index, getpid()) on `channel`.
  Worker(Channel channel, std::uint32_t index);
  // The channel a supervisor passed in SOCKSHARE_CHANNEL_FD / SOCKSHARE_WORKER_INDEX.
  // Throws Error(invalid_input) when they are missing or the descriptor is not a channel.
  [[nodiscard]] static Worker from_environment();

  // Poll for POLLIN, then call poll().
  [[nodiscard]] BorrowedFd native_handle() const noexcept { return channel_.native_handle(); }
  [[nodiscard]] std::uint32_t index() const noexcept { return index_; }

  // Takes every connection waiting on the channel without blocking, appends them to `out`
  // and acknowledges them in one message (serve only after that: the ack is what hands the
  // connection over). Returns false once the dispatcher asked to drain, went away or left
  // an ack unread for 5 s: finish what is in service (including what this call returned),
  // then exit. A batch lost at RLIMIT_NOFILE (R9) is rejected so the dispatcher resends it.
  bool poll(std::vector<Connection>& out);
  // Blocks until at least one connection arrives (true) or the dispatcher drains / goes
  // away (false); throws timed_out.
  bool wait(std::vector<Connection>& out, std::chrono::milliseconds timeout = kForever);

  // How many connections this worker is serving (below 2^31); feeds the least-loaded policy.
  // `busy`: about to do something long that keeps this worker from its channel (a CPU-heavy
  // request): least-loaded sends it nothing new until a report without it, and meanwhile
  // gives the other workers one connection at a time, so a connection waits for whichever
  // worker frees first instead of queueing behind a long request. Report the end of it at
  // once. Cheap to call often: sends only when something changed.
  void report_load(std::uint32_t active_connections, bool busy = false);

  [[nodiscard]] bool draining() const noexcept { return draining_; }

private:
  void send_or_leave(const Outgoing& message);

  Channel channel_;
  std::uint32_t index_;
  bool draining_ = false;
  bool gone_ = false;
  bool bye_sent_ = false;
  std::optional<std::uint32_t> last_load_;
  Message scratch_;
  std::vector<std::uint64_t> ack_ids_;
  std::vector<std::byte> ack_buffer_;
};

// ---- Dispatcher side ---------------------------------------------------------------------

using WorkerId = std::uint64_t;

// What a policy sees of each worker that can take a connection now.
struct WorkerView {
  WorkerId id = 0;
  std::uint32_t index = 0;
  pid_t pid = 0;
  std::uint32_t in_flight = 0;      // picked for it, not yet acknowledged
  std::uint32_t reported_load = 0;  // from the worker's last load report
  bool ready = false;               // its hello arrived (Dispatcher::workers() lists all)
  bool busy = false;                // its last load report said it is inside long work
};

enum class Policy { round_robin, least_loaded, client_hash, custom };

// A user-supplied policy: returns a position in `candidates` (never empty). Runs on the loop
// thread. A position out of range, or an exception, is logged and the first candidate serves.
using PickFunction =
    std::function<std::size_t(const ConnectionInfo&, std::span<const WorkerView> candidates)>;

struct DispatcherOptions {
  Policy policy = Policy::round_robin;
  PickFunction custom_pick = {};       // with Policy::custom
  std::uint32_t max_in_flight = 128;   // unacknowledged connections per worker (R10)
  std::size_t accept_batch = 64;       // accepts per listener per wake-up
  // > 0 (at most 16384): read the connection's first bytes before picking a worker, so a
  // custom policy can route on them; they travel as ConnectionInfo::initial_bytes. A
  // connection is handed off as soon as bytes arrived (up to peek_bytes of what is there),
  // at end of stream, or after peek_timeout with nothing; the loop never blocks on it.
  std::size_t peek_bytes = 0;
  std::chrono::milliseconds peek_timeout{1000};
  std::chrono::milliseconds ack_timeout{5000};  // a worker that does not ack in time is cut off
  // Workers a connection may be lost with. A worker cut off (it died, broke its channel,
  // missed the ack timeout) passes its unacknowledged connections on (R12); those of its
  // oldest unacknowledged batch, the only ones it can have been reading when it went (a
  // worker acks what it read before serving it), get a strike. At max_attempts strikes a
  // connection is closed and counted abandoned, so one that kills whichever worker reads it
  // cannot take every worker down in turn. 0: no limit.
  std::uint32_t max_attempts = 3;
  // least_loaded: a worker that has left a connection unacknowledged this long is not reading
  // its channel (busy on a long request) and gets nothing more while it stays so. When every
  // worker is busy, new connections wait in the kernel's backlog and go, oldest first, to the
  // first worker that catches up, instead of queueing behind one particular long request.
  // Zero turns it off.
  std::chrono::microseconds busy_after{2000};
  // While connections flow (two handoff rounds within this window), what workers send (acks,
  // load reports) is read with the next accepts rather than on its own wake-up, which halves
  // the loop's wake-ups per connection at moderate rates. The handoff latency still ends at
  // the ack's arrival (the kernel stamps it). This long after the last handoff, or whenever
  // the loop waits on the workers (all full or busy, a drain), it reads them at once again.
  // Zero reads every message on arrival.
  std::chrono::microseconds lazy_read_window{2000};
  // Accepted connections held while no worker can take them (returned by a lost worker).
  // Accepting pauses long before this; beyond it the oldest are closed and counted dropped.
  std::size_t max_pending = 4096;
  // accept() at EMFILE/ENFILE (R21): the listeners are not polled for this long (doubling
  // per repeat, up to 1 s); the kernel backlog holds the clients meanwhile.
  std::chrono::milliseconds emfile_backoff{50};
  // One line per notable event (worker joined, cut off and why, EMFILE, drain finished).
  std::function<void(std::string_view)> log = {};
};

// Counters and a handoff-latency histogram (accept to acknowledgement).
struct Stats {
  std::uint64_t accepted = 0;
  std::uint64_t dispatched = 0;     // sent to a worker
  std::uint64_t acknowledged = 0;
  std::uint64_t redispatched = 0;   // returned by a dead or broken worker, sent again
  std::uint64_t dropped = 0;        // closed without service (draining deadline, no worker)
  std::uint64_t abandoned = 0;      // of those, lost with max_attempts workers (see there)
  std::uint64_t accept_errors = 0;
  std::uint64_t emfile_events = 0;  // R21
  std::uint64_t backpressure_pauses = 0;  // accepting paused because every worker was full
  std::uint64_t worker_protocol_errors = 0;
  std::uint64_t workers_joined = 0;
  std::uint64_t workers_lost = 0;
  std::uint64_t rejected_batches = 0;  // kReject from a worker that lost descriptors (R9)
  std::uint64_t peek_timeouts = 0;     // handed off without first bytes after peek_timeout
  std::uint32_t workers = 0;
  std::uint32_t in_flight = 0;
  std::uint32_t pending = 0;           // accepted, waiting for a worker with room
  // Handoff latency histogram: upper bounds in microseconds, and counts (last = +Inf).
  std::vector<double> latency_bounds_us = {};
  std::vector<std::uint64_t> latency_counts = {};
  double latency_sum_us = 0;

  [[nodiscard]] std::string prometheus() const;  // text exposition format
};

// Single-threaded: drive it from one thread with run() or run_once(); stop() and stats()
// may be called from any thread.
class Dispatcher {
public:
  explicit Dispatcher(DispatcherOptions options = {});
  ~Dispatcher();
  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;

  // Starts accepting on a listening stream socket (TCP v4/v6 or unix stream). `name` (at
  // most 255 bytes) travels with each connection. Throws invalid_input for anything else.
  void add_listener(std::string name, Fd listening_socket);
  // A worker joins; connections flow once its hello arrives (or immediately if it already
  // sent it through a Worker constructed before).
  WorkerId add_worker(Channel channel, pid_t pid, std::uint32_t index);
  // Cuts a worker off (e.g. its process exited); its unacknowledged connections go to others.
  void remove_worker(WorkerId id);
  // Called when a worker's channel breaks, it misbehaves or misses the ack timeout (after its
  // connections were re-queued), so a supervisor can restart it. Not called for
  // remove_worker(). A Supervisor installs its own and calls the one set before it.
  std::function<void(WorkerId, pid_t)> on_worker_lost;

  // Pollable descriptor (an epoll set): readable when run_once() has work, apart from timers
  // (ack timeout, peek timeout, drain deadline, EMFILE back-off, and the end of
  // lazy_read_window, while which workers' acks do not make it readable). An outside event
  // loop waits on it for at most next_timeout() and then calls run_once(0ms).
  [[nodiscard]] BorrowedFd native_handle() const noexcept;
  // How long the loop may wait before run_once() has a timer to serve; -1 ms for none.
  [[nodiscard]] std::chrono::milliseconds next_timeout() const;

  // Shares the loop with other descriptors (a supervisor's pidfds, a signalfd, a control
  // socket): `on_ready` runs inside run_once() with the ready epoll events when `fd` is ready
  // for `events` (EPOLLIN, EPOLLOUT, ...; level-triggered). The descriptor stays the caller's;
  // unwatch it before closing it. A callback may watch/unwatch (itself included).
  void watch(BorrowedFd fd, std::uint32_t events, std::function<void(std::uint32_t)> on_ready);
  void unwatch(BorrowedFd fd);

  // The workers as the policy sees them (loop thread only), e.g. for a status report.
  [[nodiscard]] std::vector<WorkerView> workers() const;
  // One round of the event loop; returns after handling events or the timeout.
  void run_once(std::chrono::milliseconds timeout);
  // Runs until stop() or a completed drain().
  void run();
  void stop();  // thread-safe and async-signal-safe

  // Stops accepting, closes the listeners, sends drain to every worker; run() returns once
  // every connection is acknowledged and every worker said bye, or at the deadline
  // (unacknowledged connections then count as dropped).
  void drain(std::chrono::milliseconds deadline);
  // One worker finishes and leaves (a reload retiring it, a scale-down): it gets no new
  // connection from now on, receives kDrain after what was already sent to it, serves and
  // acknowledges those, says bye and exits; the others keep serving. `deadline` travels in
  // the kDrain message. Its remaining unacknowledged connections, if it goes away without
  // acknowledging them, go to the others as for any lost worker.
  void drain_worker(WorkerId id, std::chrono::milliseconds deadline);
  // True once a drain has completed (or hit its deadline).
  [[nodiscard]] bool drained() const noexcept;
  // True once stop() was called.
  [[nodiscard]] bool stopped() const noexcept;

  [[nodiscard]] Stats stats() const;  // thread-safe snapshot

private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sockshare::dispatch
