// The supervisor (see supervisor.hpp): fork+exec of worker processes with their sockets at
// fixed descriptor numbers, children tracked by pidfd inside the Dispatcher's epoll set,
// restart with backoff, crash-loop throttling, graceful stop.
#include "sockshare/supervisor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>

#include "linux/sys.hpp"
#include "sockshare/systemd.hpp"

extern char** environ;

namespace sockshare {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// waitid(P_PIDFD, ...): Linux 5.4; glibc 2.36 does not name it in idtype_t.
constexpr auto kIdPidfd = static_cast<idtype_t>(3);
// A worker the dispatcher cut off gets SIGTERM, then SIGKILL after this long.
constexpr milliseconds kCutOffKillAfter{5000};

// Debian 12's <sys/pidfd.h> lacks C linkage for C++; the syscalls are stable ABI.
int open_pidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int send_signal(int pidfd, int sig) { return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0)); }

bool is_reserved_env(std::string_view entry) {
  static constexpr std::string_view reserved[] = {
      "LISTEN_FDS=", "LISTEN_PID=", "LISTEN_FDNAMES=", "SOCKSHARE_CHANNEL_FD=",
      "SOCKSHARE_WORKER_INDEX=",
      // The supervisor is the service manager's main process: a worker that inherited the
      // manager's notify socket could announce READY=1 or STOPPING=1 on its behalf.
      "NOTIFY_SOCKET="};
  for (auto prefix : reserved) {
    if (entry.starts_with(prefix)) return true;
  }
  return false;
}

std::string env_name(std::string_view entry) {
  return std::string(entry.substr(0, entry.find('=')));
}

std::string resolve_program(const std::string& name) {
  if (name.empty()) {
    throw Error(ErrorKind::invalid_input, 0, "Supervisor::start", "empty worker command");
  }
  if (name.find('/') != std::string::npos) {
    if (::access(name.c_str(), X_OK) != 0) sys::throw_errno("worker command " + name);
    return name;
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr && *path != '\0' ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    const auto colon = dirs.find(':');
    std::string dir(dirs.substr(0, colon));
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  throw Error(ErrorKind::invalid_input, ENOENT, "worker command " + name, "not found in PATH");
}

std::string describe_status(int status) {
  if (status >= 128) return "killed by signal " + std::to_string(status - 128);
  return "exited with status " + std::to_string(status);
}


struct Slot {
  std::uint32_t index = 0;
  pid_t pid = 0;
  Fd pidfd;
  bool running = false;
  dispatch::WorkerId worker_id = 0;
  Clock::time_point started_at{};
  Clock::time_point restart_at = Clock::time_point::max();
  Clock::time_point kill_at = Clock::time_point::max();
  bool term_sent = false;
  milliseconds backoff{0};
  std::deque<Clock::time_point> recent_exits;
  bool crash_looping = false;
  std::uint64_t starts = 0;
  std::uint64_t exits = 0;
  int last_status = -1;
  std::vector<Fd> own_listeners;  // inherit mode, one SO_REUSEPORT socket per listener
};

}  // namespace

struct Supervisor::Impl {
  Supervisor& self;
  dispatch::Dispatcher& dispatcher;
  SupervisorOptions opt;
  std::string program;
  std::vector<std::string> base_env;
  std::vector<Slot> slots;
  std::vector<Fd> shared_listeners;    // inherit mode, indexed like opt.listeners
  std::vector<bool> per_worker;        // listener i is a reuse-port group
  std::vector<Endpoint> endpoints;
  bool started = false;
  bool shutting_down = false;
  Clock::time_point term_at = Clock::time_point::max();
  Clock::time_point kill_at = Clock::time_point::max();
  bool killed_all = false;
  bool stopped_reported = false;
  std::function<void(dispatch::WorkerId, pid_t)> previous_lost;

  Impl(Supervisor& s, dispatch::Dispatcher& d, SupervisorOptions o)
      : self(s), dispatcher(d), opt(std::move(o)) {}

  void log(const std::string& line) const {
    if (opt.log) opt.log(line);
  }
  void event(SupervisorEvent::Kind kind, const Slot& slot, int status = -1, milliseconds delay = {}) {
    if (self.on_event) self.on_event({kind, slot.index, slot.pid, status, delay});
  }
  std::string who(const Slot& slot) const {
    return "worker " + std::to_string(slot.index) + " (pid " + std::to_string(slot.pid) + ")";
  }

  void signal(Slot& slot, int sig) {
    if (!slot.running) return;
    // By pidfd: the process cannot have been replaced by another with the same pid (R17).
    if (send_signal(slot.pidfd.get(), sig) != 0 && errno != ESRCH) {
      log(who(slot) + ": pidfd_send_signal(" + std::to_string(sig) + "): " + errno_name(errno));
    }
  }

  void prepare() {
    if (opt.argv.empty()) {
      throw Error(ErrorKind::invalid_input, 0, "Supervisor::start", "no worker command");
    }
    if (opt.workers == 0) {
      throw Error(ErrorKind::invalid_input, 0, "Supervisor::start", "workers must be at least 1");
    }
    program = resolve_program(opt.argv[0]);
    for (char** e = environ; *e != nullptr; ++e) {
      std::string_view entry(*e);
      if (is_reserved_env(entry)) continue;
      const std::string name = env_name(entry);
      const bool overridden = std::any_of(opt.env.begin(), opt.env.end(), [&](const std::string& x) {
        return env_name(x) == name;
      });
      if (!overridden) base_env.emplace_back(entry);
    }
    for (const auto& extra : opt.env) {
      if (!is_reserved_env(extra)) base_env.push_back(extra);
    }
    slots.resize(opt.workers);
    for (std::uint32_t i = 0; i < opt.workers; ++i) slots[i].index = i;
    if (opt.mode == WorkerMode::inherit) open_listeners();
  }

  void open_listeners() {
    if (opt.listeners.empty()) {
      throw Error(ErrorKind::invalid_input, 0, "Supervisor::start", "inherit mode needs listeners");
    }
    for (auto& l : opt.listeners) {
      if (!systemd::is_valid_name(l.name)) {
        throw Error(ErrorKind::invalid_input, 0, "Supervisor::start",
                    "listener name \"" + l.name +
                        "\" is not valid for LISTEN_FDNAMES (1-255 printable ASCII, no ':')");
      }
      const bool unix_socket = l.endpoint.kind == Endpoint::Kind::unix_path ||
                               l.endpoint.kind == Endpoint::Kind::unix_abstract;
      const bool group = opt.reuse_port_per_worker && !(l.socket.valid() ? identify(l.socket.borrow()).family == AF_UNIX : unix_socket);
      Fd first = std::move(l.socket);
      if (!first.valid()) first = listen_on(l.endpoint, {.reuse_port = group});
      if (auto why = mismatch(identify(first.borrow()), Expect::stream_listener)) {
        throw Error(ErrorKind::invalid_input, 0, "inherit listener " + l.name, *why);
      }
      // Blocking, as systemd passes them (NonBlocking=no): a program written for socket
      // activation may call a plain accept(). The flag is shared by every copy (R14), so it is
      // set once here, before any worker runs; workers that want O_NONBLOCK set it themselves.
      if (opt.set_listeners_blocking) set_nonblocking(first.borrow(), false);
      const Endpoint bound = local_endpoint(first.borrow());
      endpoints.push_back(bound);
      per_worker.push_back(group);
      if (group) {
        // The group shares the port the first socket got (port 0 resolved once).
        slots[0].own_listeners.push_back(std::move(first));
        // Each clone is configured like the first (say, TCP_DEFER_ACCEPT from DeferAcceptSec=).
        const std::chrono::seconds defer = defer_accept_of(slots[0].own_listeners.back().borrow());
        for (std::uint32_t i = 1; i < opt.workers; ++i) {
          slots[i].own_listeners.push_back(
              listen_on(bound, {.reuse_port = true, .nonblocking = false, .defer_accept = defer}));
        }
        shared_listeners.emplace_back();
      } else {
        for (auto& s : slots) s.own_listeners.emplace_back();
        shared_listeners.push_back(std::move(first));
      }
    }
  }

  void spawn(Slot& slot) {
    const auto now = Clock::now();
    slot.restart_at = Clock::time_point::max();
    std::optional<Channel> ours;
    std::optional<Channel> theirs;
    std::vector<std::string> env = base_env;
    env.push_back(std::string(dispatch::kWorkerIndexEnv) + "=" + std::to_string(slot.index));
    std::vector<systemd::PassedListener> listeners;
    std::vector<BorrowedFd> channel;
    if (opt.mode == WorkerMode::dispatch) {
      auto [a, b] = Channel::pair();
      ours.emplace(std::move(a));
      theirs.emplace(std::move(b));
      channel.push_back(theirs->native_handle());
      env.push_back(std::string(dispatch::kChannelFdEnv) + "=" + std::to_string(systemd::kListenFdsStart));
    } else {
      for (std::size_t i = 0; i < shared_listeners.size(); ++i) {
        listeners.push_back({per_worker[i] ? slot.own_listeners[i].borrow() : shared_listeners[i].borrow(),
                             opt.listeners[i].name});
      }
    }
    // Descriptors from 3 and LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID (inherit mode), or the
    // channel at 3 (dispatch mode), prepared now: nothing may allocate after fork.
    systemd::ActivationLayout layout(listeners, std::move(env), channel);
    std::vector<std::string> argv_copy = opt.argv;
    std::vector<char*> argv;
    for (auto& a : argv_copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    const int death_signal = opt.parent_death_signal;
    const char* path = program.c_str();

    const pid_t pid = ::fork();
    if (pid < 0) {
      const int err = errno;
      schedule_restart(slot, now, "fork failed: " + errno_name(err));
      return;
    }
    if (pid == 0) {
      // Child: async-signal-safe calls only.
      if (death_signal != 0) {
        ::prctl(PR_SET_PDEATHSIG, death_signal);
        if (::getppid() != parent) ::_exit(127);
      }
      sigset_t none;
      ::sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      ::sigaction(SIGPIPE, &dfl, nullptr);
      if (layout.apply_in_child() != 0) ::_exit(126);
      // apply_in_child() marks the rest close-on-exec, which kernels before 5.11 cannot do
      // (close_range without CLOSE_RANGE_CLOEXEC exists from 5.9): nothing above the laid-out
      // range is needed before execve, so close it outright as well.
      ::close_range(static_cast<unsigned>(systemd::kListenFdsStart + layout.descriptor_count()), ~0U, 0);
      ::execve(path, argv.data(), layout.envp());
      ::_exit(127);
    }

    // Not reaped yet, so the pid cannot name another process: pidfd_open is race-free here.
    const int raw_pidfd = open_pidfd(pid);
    if (raw_pidfd < 0) {
      const int err = errno;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      sys::throw_errno("pidfd_open(" + std::to_string(pid) + ")", err);
    }
    slot.pidfd = Fd(raw_pidfd);  // the kernel sets close-on-exec on pidfds
    slot.pid = pid;
    slot.running = true;
    slot.term_sent = false;
    slot.kill_at = Clock::time_point::max();
    slot.started_at = now;
    ++slot.starts;
    theirs.reset();
    const std::uint32_t index = slot.index;
    dispatcher.watch(slot.pidfd.borrow(), EPOLLIN, [this, index](std::uint32_t) { reap(slots[index]); });
    if (ours) slot.worker_id = dispatcher.add_worker(std::move(*ours), pid, slot.index);
    log(who(slot) + " started");
    event(SupervisorEvent::Kind::started, slot);
  }

  void reap(Slot& slot) {
    if (!slot.running) return;
    siginfo_t info{};
    if (::waitid(kIdPidfd, static_cast<id_t>(slot.pidfd.get()), &info, WEXITED | WNOHANG) != 0) {
      if (errno == EINTR || errno == EAGAIN) return;
      sys::throw_errno("waitid(P_PIDFD, " + std::to_string(slot.pidfd.get()) + ")");
    }
    if (info.si_pid == 0) return;  // not yet
    const int status = info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
    dispatcher.unwatch(slot.pidfd.borrow());
    slot.pidfd.reset();
    slot.running = false;
    slot.last_status = status;
    ++slot.exits;
    if (slot.worker_id != 0) {
      // Its unacknowledged connections go to the others now, not after an ack timeout.
      dispatcher.remove_worker(slot.worker_id);
      slot.worker_id = 0;
    }
    const auto now = Clock::now();
    const auto ran = std::chrono::duration_cast<milliseconds>(now - slot.started_at);
    log(who(slot) + " " + describe_status(status) + " after " + std::to_string(ran.count()) + " ms");
    event(SupervisorEvent::Kind::exited, slot, status);
    if (shutting_down) {
      if (finished() && !stopped_reported) {
        stopped_reported = true;
        // Nothing will be spawned again: our copies of the listeners only cost descriptors
        // now (the sockets live on in whoever else holds them).
        shared_listeners.clear();
        for (auto& s : slots) s.own_listeners.clear();
        log("all workers stopped");
        if (self.on_event) self.on_event({SupervisorEvent::Kind::stopped, 0, 0, -1, {}});
      }
      return;
    }
    if (now - slot.started_at >= opt.stable_after) {
      slot.backoff = milliseconds(0);
      slot.recent_exits.clear();
      slot.crash_looping = false;
    }
    schedule_restart(slot, now, {});
  }

  void schedule_restart(Slot& slot, Clock::time_point now, const std::string& why) {
    slot.recent_exits.push_back(now);
    while (!slot.recent_exits.empty() && now - slot.recent_exits.front() > opt.crash_loop_window) {
      slot.recent_exits.pop_front();
    }
    slot.backoff = slot.backoff.count() == 0 ? opt.initial_backoff : std::min(slot.backoff * 2, opt.max_backoff);
    if (slot.recent_exits.size() >= opt.crash_loop_exits) {
      slot.backoff = opt.max_backoff;
      if (!slot.crash_looping) {
        slot.crash_looping = true;
        log("worker " + std::to_string(slot.index) + " is crash looping: " +
            std::to_string(slot.recent_exits.size()) + " exits within " +
            std::to_string(opt.crash_loop_window.count()) + " ms; restarts throttled to one per " +
            std::to_string(opt.max_backoff.count()) + " ms");
        event(SupervisorEvent::Kind::crash_loop, slot, slot.last_status, slot.backoff);
      }
    }
    slot.restart_at = now + slot.backoff;
    log("worker " + std::to_string(slot.index) + (why.empty() ? "" : ": " + why) + " restarting in " +
        std::to_string(slot.backoff.count()) + " ms");
    event(SupervisorEvent::Kind::restart_scheduled, slot, slot.last_status, slot.backoff);
  }

  void on_lost(dispatch::WorkerId id, pid_t pid) {
    if (previous_lost) previous_lost(id, pid);
    for (auto& slot : slots) {
      if (slot.worker_id != id) continue;
      slot.worker_id = 0;
      if (!slot.running) return;
      // A crashed worker's channel usually reports end of stream before its pidfd event is
      // handled: then this is an exit to reap, not a live worker to terminate.
      pollfd p{slot.pidfd.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) == 1) {
        reap(slot);
        return;
      }
      log(who(slot) + " was cut off by the dispatcher; terminating it");
      signal(slot, SIGTERM);
      slot.term_sent = true;
      slot.kill_at = Clock::now() + kCutOffKillAfter;
      return;
    }
  }

  Clock::time_point next_timer() const {
    Clock::time_point at = Clock::time_point::max();
    for (const auto& s : slots) {
      if (!s.running && !shutting_down) at = std::min(at, s.restart_at);
      if (s.running) at = std::min(at, s.kill_at);
    }
    if (shutting_down && !killed_all) at = std::min({at, term_at, kill_at});
    return at;
  }

  void timers() {
    const auto now = Clock::now();
    for (auto& s : slots) {
      if (s.running && now >= s.kill_at) {
        log(who(s) + " did not exit after SIGTERM; sending SIGKILL");
        signal(s, SIGKILL);
        s.kill_at = Clock::time_point::max();
        event(SupervisorEvent::Kind::killed, s);
      }
      if (!shutting_down && !s.running && now >= s.restart_at) {
        // A restart that cannot happen now (EMFILE for the channel, fork's EAGAIN) is retried
        // with the same backoff instead of ending the supervisor.
        try {
          spawn(s);
        } catch (const Error& e) {
          schedule_restart(s, now, std::string("start failed: ") + e.what());
        }
      }
    }
    if (!shutting_down) return;
    if (now >= term_at) {
      term_at = Clock::time_point::max();
      for (auto& s : slots) {
        if (s.running && !s.term_sent) {
          signal(s, SIGTERM);
          s.term_sent = true;
        }
      }
    }
    if (!killed_all && now >= kill_at) {
      killed_all = true;
      for (auto& s : slots) {
        if (!s.running) continue;
        log(who(s) + " still running at the shutdown deadline; sending SIGKILL");
        signal(s, SIGKILL);
        event(SupervisorEvent::Kind::killed, s);
      }
    }
  }

  void stop(milliseconds grace, bool drain_dispatcher);

  [[nodiscard]] bool finished() const {
    if (!shutting_down) return false;
    return std::none_of(slots.begin(), slots.end(), [](const Slot& s) { return s.running; });
  }
};

Supervisor::Supervisor(dispatch::Dispatcher& dispatcher, SupervisorOptions options)
    : impl_(std::make_unique<Impl>(*this, dispatcher, std::move(options))) {
  if (impl_->opt.ignore_sigpipe) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    ::sigaction(SIGPIPE, &ign, nullptr);
  }
  impl_->previous_lost = std::move(dispatcher.on_worker_lost);
  dispatcher.on_worker_lost = [impl = impl_.get()](dispatch::WorkerId id, pid_t pid) { impl->on_lost(id, pid); };
}

Supervisor::~Supervisor() {
  Impl& s = *impl_;
  for (auto& slot : s.slots) {
    if (!slot.running) continue;
    s.signal(slot, SIGKILL);
    siginfo_t info{};
    sys::retry_eintr([&] { return ::waitid(kIdPidfd, static_cast<id_t>(slot.pidfd.get()), &info, WEXITED); });
    s.dispatcher.unwatch(slot.pidfd.borrow());
    if (slot.worker_id != 0) s.dispatcher.remove_worker(slot.worker_id);
    slot.running = false;
  }
  s.dispatcher.on_worker_lost = std::move(s.previous_lost);
}

void Supervisor::start() {
  Impl& s = *impl_;
  if (s.started) throw Error(ErrorKind::invalid_input, 0, "Supervisor::start", "already started");
  s.prepare();
  s.started = true;
  for (auto& slot : s.slots) s.spawn(slot);
}

void Supervisor::run_once(std::chrono::milliseconds timeout) {
  Impl& s = *impl_;
  const auto now = Clock::now();
  const auto at = s.next_timer();
  if (at != Clock::time_point::max()) {
    const auto left = std::chrono::ceil<milliseconds>(at - now);
    const auto timer = std::max(milliseconds(0), left);
    timeout = timeout.count() < 0 ? timer : std::min(timeout, timer);
  }
  s.dispatcher.run_once(timeout);
  s.timers();
}

void Supervisor::run() {
  while (!finished() && !impl_->dispatcher.stopped()) run_once(kForever);
}

void Supervisor::shutdown(std::chrono::milliseconds grace) { impl_->stop(grace, true); }

void Supervisor::retire(std::chrono::milliseconds grace) { impl_->stop(grace, false); }

std::chrono::steady_clock::time_point Supervisor::next_timer() const { return impl_->next_timer(); }

void Supervisor::run_timers() { impl_->timers(); }

void Supervisor::Impl::stop(std::chrono::milliseconds grace, bool drain_dispatcher) {
  Impl& s = *this;
  const bool drain = drain_dispatcher && s.opt.mode == WorkerMode::dispatch;
  const auto now = Clock::now();
  const auto deadline = now + grace;
  if (s.shutting_down) {
    s.kill_at = std::min(s.kill_at, deadline);
    s.term_at = std::min(s.term_at, deadline);
    if (drain) s.dispatcher.drain(grace);
    return;
  }
  s.shutting_down = true;
  s.kill_at = deadline;
  std::size_t running = 0;
  for (auto& slot : s.slots) {
    slot.restart_at = Clock::time_point::max();
    if (slot.running) ++running;
  }
  s.log("stopping " + std::to_string(running) + " worker(s), grace " + std::to_string(grace.count()) + " ms");
  if (drain) {
    // The drain message asks each worker to finish; SIGTERM follows halfway to the deadline
    // for workers that do not read their channel, SIGKILL at the deadline.
    s.dispatcher.drain(grace);
    s.term_at = now + grace / 2;
  } else if (s.opt.mode == WorkerMode::dispatch) {
    // Retiring these workers while the dispatcher goes on serving (a reload): each gets no
    // new connection and a drain message after what was sent to it. A signal instead would
    // leave the dispatcher sending it connections until it exited.
    for (auto& slot : s.slots) {
      if (slot.running && slot.worker_id != 0) s.dispatcher.drain_worker(slot.worker_id, grace);
    }
    s.term_at = now + grace / 2;
  } else {
    s.term_at = now;
  }
  s.timers();
}

bool Supervisor::finished() const { return impl_->finished(); }

std::vector<WorkerStatus> Supervisor::status() const {
  std::vector<WorkerStatus> out;
  for (const auto& s : impl_->slots) {
    out.push_back({s.index, s.running ? s.pid : 0, s.running, s.starts, s.exits, s.crash_looping,
                   s.last_status, s.worker_id});
  }
  return out;
}

std::vector<Endpoint> Supervisor::listener_endpoints() const { return impl_->endpoints; }

}  // namespace sockshare
