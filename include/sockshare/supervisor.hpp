// The supervisor: spawns N worker processes from one argv, hands them their sockets, restarts
// the ones that exit (with backoff, crash loops reported and throttled) and stops them all
// gracefully. It shares the Dispatcher's event loop: child processes are tracked with pidfds
// watched in the same epoll set, so there is no SIGCHLD handler and no signal race. (Nothing
// else in the process may call waitpid(-1): it would take our children's exit statuses.)
//
// How the command wires it (one thread drives everything):
//
//   dispatch::Dispatcher dispatcher(dispatcher_options);     // policy, max_in_flight, ...
//   for (auto& l : listeners) dispatcher.add_listener(l.name, std::move(l.socket));
//   Supervisor supervisor(dispatcher, supervisor_options);   // argv, workers, mode, log
//   supervisor.start();                                      // spawns the workers
//   dispatcher.watch(signal_fd.borrow(), EPOLLIN, [&](std::uint32_t) {  // signalfd: SIGTERM
//     supervisor.shutdown(std::chrono::seconds(10));         // drain, SIGTERM, SIGKILL at 10 s
//   });
//   dispatcher.watch(control_socket.borrow(), EPOLLIN, ...); // `sockshare status`
//   supervisor.run();   // returns when shutdown() has finished: every worker reaped
//
// Stop through Supervisor::shutdown(), not Dispatcher::drain(): a drained worker exits, and
// only the supervisor knows not to restart it then.
//
// In inherit mode the Dispatcher carries no listeners; it is only the event loop. The
// supervisor installs Dispatcher::on_worker_lost (calling any callback set before it), so a
// worker the dispatcher cut off (garbage on its channel, ack timeout) is terminated and
// restarted.
//
// Signals: the supervisor ignores SIGPIPE in its own process (every send uses MSG_NOSIGNAL
// anyway) and resets SIGPIPE to the default, and the signal mask to empty, in each child so
// an external program starts with the dispositions it expects. It never installs a SIGCHLD
// handler; callers that block signals for a signalfd keep doing so.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sockshare/dispatch.hpp"
#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"

namespace sockshare {

enum class WorkerMode {
  // Each worker gets one end of a channel as an inherited descriptor named by
  // SOCKSHARE_CHANNEL_FD (plus SOCKSHARE_WORKER_INDEX), and the supervisor adds the other
  // end to the Dispatcher. Build the worker with dispatch::Worker::from_environment().
  dispatch,
  // Each worker gets the listeners (blocking, as systemd passes them; set once at start(),
  // the flag being shared, R14) by the systemd convention: descriptors 3, 4, ... with
  // LISTEN_FDS=n, LISTEN_PID=<the worker's own pid>, LISTEN_FDNAMES=name1:name2 (plus
  // SOCKSHARE_WORKER_INDEX). Any program that supports socket activation works unchanged.
  inherit,
};

// A listener for inherit mode.
struct InheritListener {
  std::string name = {};  // its LISTEN_FDNAMES entry: systemd::is_valid_name() (1-255 printable ASCII, no ':')
  // shared mode: the listening socket every worker inherits (from listen_on()).
  // per-worker mode: optional; when valid it is the first SO_REUSEPORT socket of the group
  // and must have been opened with ListenOptions::reuse_port.
  Fd socket = {};
  // per-worker mode: where to open one more SO_REUSEPORT listener per worker. A port of 0 is
  // resolved once, so every worker listens on the same port. Unix endpoints cannot be
  // reuse-port groups; they are shared in either mode.
  Endpoint endpoint = {};
};

struct SupervisorOptions {
  // The worker program and its arguments. argv[0] without a '/' is looked up in PATH once,
  // by start(), which throws Error(invalid_input) when it is not found or not executable.
  std::vector<std::string> argv = {};
  std::uint32_t workers = 1;
  WorkerMode mode = WorkerMode::dispatch;
  // inherit mode only.
  std::vector<InheritListener> listeners = {};
  // inherit mode: one SO_REUSEPORT listener per worker (the kernel spreads connections)
  // instead of one listener shared by all (workers may poll it with EPOLLEXCLUSIVE). A
  // worker's own listener is kept open by the supervisor across its restarts, so its accept
  // queue is not lost when it crashes.
  bool reuse_port_per_worker = false;
  // inherit mode: make the listeners blocking at start(), as systemd passes them. A second
  // generation started on the same listeners while the first still runs sets this to false:
  // O_NONBLOCK is shared by every copy (R14), and clearing it under a worker that set it
  // would leave that worker blocked in accept().
  bool set_listeners_blocking = true;
  // Extra NAME=value environment entries for every worker. LISTEN_*, SOCKSHARE_CHANNEL_FD,
  // SOCKSHARE_WORKER_INDEX and NOTIFY_SOCKET are never copied from the supervisor's own
  // environment (the supervisor is the process a service manager listens to).
  std::vector<std::string> env = {};

  // Restart with exponential backoff: the first restart of a slot waits initial_backoff,
  // each further one twice as long, up to max_backoff. A worker that ran for stable_after
  // without exiting resets its slot's backoff.
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{10000};
  std::chrono::milliseconds stable_after{10000};
  // crash_loop_exits exits of one slot within crash_loop_window is a crash loop: reported
  // once (log line + on_event) and throttled to max_backoff until the slot is stable again.
  std::uint32_t crash_loop_exits = 5;
  std::chrono::milliseconds crash_loop_window{10000};

  // The workers die with the supervisor (PR_SET_PDEATHSIG) if it is killed outright. The
  // kernel ties this to the *thread* that started them (start(), restarts from run_once()):
  // drive the supervisor from a thread that lives as long as the workers should, or set 0.
  int parent_death_signal = 9;  // SIGKILL; 0 to leave workers running
  // Ignore SIGPIPE in the supervisor's process (children get the default back either way).
  bool ignore_sigpipe = true;

  // One line per event: worker started, exited, restarted, crash loop, killed at deadline.
  std::function<void(std::string_view)> log = {};
};

struct SupervisorEvent {
  // killed: SIGKILL sent (shutdown deadline, or 5 s after a worker the dispatcher cut off
  // ignored SIGTERM). stopped: after shutdown(), the last worker was reaped (index/pid 0).
  enum class Kind { started, exited, restart_scheduled, crash_loop, killed, stopped };
  Kind kind = Kind::started;
  std::uint32_t index = 0;  // worker slot
  pid_t pid = 0;
  int exit_status = -1;     // exited: status, or 128 + signal number
  std::chrono::milliseconds delay{0};  // restart_scheduled / crash_loop: wait before restart
};

// One worker slot as the supervisor sees it, for `sockshare status`.
struct WorkerStatus {
  std::uint32_t index = 0;
  pid_t pid = 0;              // 0 while waiting to restart
  bool running = false;
  std::uint64_t starts = 0;   // processes started in this slot
  std::uint64_t exits = 0;
  bool crash_looping = false;
  int last_exit_status = -1;
  dispatch::WorkerId worker_id = 0;  // dispatch mode: the Dispatcher's id, 0 otherwise
};

// Single-threaded, driven by the thread that drives the Dispatcher.
class Supervisor {
public:
  // `dispatcher` must outlive the supervisor.
  Supervisor(dispatch::Dispatcher& dispatcher, SupervisorOptions options);
  // Kills (SIGKILL) and reaps every worker still running: never leaves a zombie or an orphan.
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Resolves argv[0], opens per-worker listeners, spawns every worker. Throws on a bad argv
  // or when a listener cannot be opened; a worker that fails to exec exits 127 and is
  // restarted with backoff like any other exit.
  void start();

  // One round of the shared loop: the dispatcher's events, child exits, due restarts and the
  // shutdown deadline. Returns after handling events or the timeout.
  void run_once(std::chrono::milliseconds timeout);
  // Runs until shutdown() has finished (or Dispatcher::stop() was called).
  void run();

  // Graceful stop, non-blocking: no more restarts. Inherit mode: SIGTERM to every worker
  // now. Dispatch mode: the dispatcher drains (listeners closed, kDrain sent to each worker
  // after its last connections) with the same deadline, and workers still running halfway
  // to the deadline get SIGTERM. At the deadline the ones still running get SIGKILL. run()
  // returns once every worker is reaped. Safe to call again (only shortens the deadline).
  void shutdown(std::chrono::milliseconds grace);
  // True once shutdown() was called and every worker has been reaped.
  [[nodiscard]] bool finished() const;

  // Retiring one generation of several that share the dispatcher: like shutdown() (no more
  // restarts, SIGKILL at the deadline) but the dispatcher keeps its listeners and the other
  // generations' workers. Dispatch workers are drained one by one (Dispatcher::drain_worker:
  // nothing new is sent to them, they serve what they were sent and leave), SIGTERM follows
  // halfway to the deadline for those still running; inherit workers get SIGTERM now.
  void retire(std::chrono::milliseconds grace);

  // For a caller that drives several supervisors on one dispatcher: the next moment one of
  // this supervisor's timers (restart, SIGTERM/SIGKILL deadline) is due, and running the
  // timers that are due. run_once() does both around Dispatcher::run_once().
  [[nodiscard]] std::chrono::steady_clock::time_point next_timer() const;
  void run_timers();

  // Structured twin of the log line, e.g. for counters or tests.
  std::function<void(const SupervisorEvent&)> on_event;

  [[nodiscard]] std::vector<WorkerStatus> status() const;
  // inherit mode with port 0: the endpoint each listener actually got.
  [[nodiscard]] std::vector<Endpoint> listener_endpoints() const;

private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sockshare
