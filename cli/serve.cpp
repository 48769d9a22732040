#include "serve.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "control.hpp"
#include "linux/sys.hpp"
#include "log.hpp"
#include "sockshare/dispatch.hpp"
#include "sockshare/error.hpp"
#include "sockshare/handoff.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/supervisor.hpp"
#include "sockshare/systemd.hpp"

namespace sockshare::cli {
namespace {

using namespace std::chrono_literals;

struct ListenSpec {
  std::string name;
  Endpoint endpoint;
};

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

std::vector<ListenSpec> parse_listeners(const std::vector<std::string>& texts) {
  std::vector<ListenSpec> specs;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    std::string_view text = texts[i];
    ListenSpec spec;
    spec.name = i == 0 ? "http" : "http" + std::to_string(i);
    // "name=endpoint": the name becomes the listener's LISTEN_FDNAMES entry.
    if (auto eq = text.find('='); eq != std::string_view::npos && !text.starts_with("unix:")) {
      spec.name = std::string(text.substr(0, eq));
      text.remove_prefix(eq + 1);
      if (!valid_name(spec.name)) {
        throw UsageError("--listen " + texts[i] + ": a listener name is 1-64 of [A-Za-z0-9_.-]");
      }
    }
    try {
      spec.endpoint = parse_endpoint(text);
    } catch (const Error& e) {
      throw UsageError("--listen " + texts[i] + ": " + e.what());
    }
    for (const auto& other : specs) {
      if (other.name == spec.name)
        throw UsageError("--listen: listener name " + spec.name + " used twice");
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

dispatch::Policy parse_policy(const std::string& text) {
  if (text == "rr") return dispatch::Policy::round_robin;
  if (text == "least") return dispatch::Policy::least_loaded;
  if (text == "hash") return dispatch::Policy::client_hash;
  throw UsageError("--policy " + text + ": expected rr, least or hash");
}

void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    ssize_t n = sys::retry_eintr([&] { return ::write(fd, text.data(), text.size()); });
    if (n <= 0) return;  // the parent stopped listening; readiness is only a courtesy
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

std::string_view event_name(SupervisorEvent::Kind kind) {
  switch (kind) {
    case SupervisorEvent::Kind::started:
      return "worker-started";
    case SupervisorEvent::Kind::exited:
      return "worker-exited";
    case SupervisorEvent::Kind::restart_scheduled:
      return "worker-restart-scheduled";
    case SupervisorEvent::Kind::crash_loop:
      return "worker-crash-loop";
    case SupervisorEvent::Kind::killed:
      return "worker-killed";
    case SupervisorEvent::Kind::stopped:
      return "workers-stopped";
  }
  return "worker-event";
}

// "<= 50us" for the bucket holding the q-quantile of the histogram.
std::string quantile(const dispatch::Stats& stats, double q) {
  std::uint64_t total = 0;
  for (auto c : stats.latency_counts) total += c;
  if (total == 0) return "-";
  const auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(total)));
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < stats.latency_counts.size(); ++i) {
    seen += stats.latency_counts[i];
    if (seen >= rank) {
      if (i < stats.latency_bounds_us.size())
        return fmt::format("<= {:g} us", stats.latency_bounds_us[i]);
      break;
    }
  }
  return stats.latency_bounds_us.empty() ? "-"
                                         : fmt::format("> {:g} us", stats.latency_bounds_us.back());
}

// Where a serve process offers its listeners to the next serve (`--upgrade-from`): next to
// its control socket, so it is as private as that one (docs/HANDOFF.md, "Upgrading serve").
Endpoint handoff_endpoint(Endpoint control) {
  if (!control.path.ends_with(".handoff")) control.path += ".handoff";
  return control;
}

// --upgrade-from: a pid (the default control socket of that serve) or a control endpoint.
Endpoint upgrade_source(const std::string& text) {
  const bool digits = !text.empty() && std::all_of(text.begin(), text.end(),
                                                   [](char c) { return c >= '0' && c <= '9'; });
  Endpoint control;
  if (digits) {
    control = control::default_endpoint(static_cast<pid_t>(std::stol(text)), false);
  } else {
    try {
      control = parse_endpoint(text);
    } catch (const Error& e) {
      throw UsageError("--upgrade-from " + text + ": " + e.what());
    }
    if (control.kind != Endpoint::Kind::unix_path &&
        control.kind != Endpoint::Kind::unix_abstract) {
      throw UsageError("--upgrade-from " + text + ": a pid, unix:/path or unix:@name");
    }
  }
  return handoff_endpoint(control);
}

// A new generation of inherit-mode workers gets no hello to wait for: it counts as ready once
// every one of its workers has run this long without exiting (docs/SERVE.md, "Reload").
constexpr std::chrono::milliseconds kInheritReadyWindow{300};
// A retired generation that failed to start gets this long to exit after SIGTERM.
constexpr std::chrono::milliseconds kFailedGenerationGrace{1000};

// One set of workers started by one configuration load: the first at start, one more per
// reload. Several may be alive at once: the serving one, one starting, and older ones still
// draining their connections (tableflip #52: a reload must not wait for them).
struct Generation {
  enum class State { starting, serving, failed, retired };
  std::uint32_t number = 0;
  State state = State::starting;
  std::chrono::steady_clock::time_point started_at = std::chrono::steady_clock::now();
  std::unique_ptr<Supervisor> supervisor;
};

std::string_view state_name(Generation::State state) {
  switch (state) {
    case Generation::State::starting:
      return "starting";
    case Generation::State::serving:
      return "serving";
    case Generation::State::failed:
      return "failed";
    case Generation::State::retired:
      return "draining";
  }
  return "?";
}

class Serve {
 public:
  Serve(const ServeOptions& options, const std::string& self_path, systemd::ListenFds activation);
  ~Serve();
  Serve(const Serve&) = delete;
  Serve& operator=(const Serve&) = delete;
  int run();

 private:
  void open_listeners();
  InheritListener inherit_copy(std::size_t i) const;
  Generation& start_generation();
  void on_signal();
  void on_supervisor_event(std::uint32_t generation, const SupervisorEvent& event);
  void request_reload(control::Server::Done done);
  void begin_reload();
  void check_generations();
  bool generation_ready(const Generation& g) const;
  void finish_reload(Generation& g, bool ok, const std::string& why);
  void shutdown(std::chrono::milliseconds grace);
  void sd_notify(std::string_view what, const std::function<bool()>& send);
  void ready_line(const std::string& lines);
  bool all_finished() const;
  bool retired(std::uint32_t generation) const;
  void take_over();
  void offer_handoff(const Endpoint& control);
  void on_handed_over();
  void stop_handoff();
  void finish_upgrade(bool ok, const std::string& why);
  Generation* serving();
  std::string render(std::string_view format) const;
  std::string render_text() const;
  std::string render_prometheus() const;

  const ServeOptions& options_;
  std::string policy_;  // the dispatch policy in effect
  std::string self_path_;
  systemd::ListenFds activation_;
  std::vector<ListenSpec> specs_;
  std::vector<Endpoint> bound_;      // what each listener actually got (port 0 resolved)
  std::vector<std::chrono::seconds> defer_accept_;  // each listener's TCP_DEFER_ACCEPT
  std::vector<Fd> inherit_sockets_;  // inherit mode: our copy, duplicated for each generation
  bool dispatch_mode_ = true;
  dispatch::DispatcherOptions dispatcher_options_;
  std::optional<dispatch::Dispatcher> dispatcher_;
  // Oldest first; destroyed newest first, because each Supervisor chains the dispatcher's
  // on_worker_lost callback to the one installed before it.
  std::vector<std::unique_ptr<Generation>> generations_;
  std::optional<control::Server> control_;
  Fd signals_;
  Fd ready_;
  std::uint32_t next_generation_ = 1;
  bool ready_sent_ = false;
  bool stopping_ = false;
  bool reload_queued_ = false;
  std::vector<control::Server::Done> reload_waiters_;  // for the generation starting now
  std::vector<control::Server::Done> queued_waiters_;  // for the reload after it
  // --upgrade-from: the exchange with the serve we take over from, until commit or abort.
  std::optional<handoff::HandoffClient> upgrade_;
  Endpoint upgrade_endpoint_;
  pid_t upgraded_from_ = 0;
  // Dispatch mode during an upgrade: the taken listeners are accepted on only after commit,
  // so nothing accepted here is lost if this process fails before it.
  std::vector<std::pair<std::string, Fd>> deferred_listeners_;
  // The offer to the next serve: a HandoffServer served on its own thread (an exchange
  // blocks while the taker starts its workers; the loop must keep serving meanwhile).
  std::optional<handoff::HandoffServer> handoff_;
  std::vector<Fd> handoff_copies_;  // dispatch mode: the dispatcher owns the originals
  std::thread handoff_thread_;
  std::atomic<bool> handoff_stop_{false};
  std::atomic<pid_t> handed_to_{0};
  Fd handoff_event_;  // eventfd: the thread tells the loop it handed over
  int exit_status_ = 0;
  std::uint64_t reloads_ok_ = 0;
  std::uint64_t reloads_failed_ = 0;
  std::chrono::steady_clock::time_point start_time_ = std::chrono::steady_clock::now();
};

Serve::Serve(const ServeOptions& options, const std::string& self_path,
             systemd::ListenFds activation)
    : options_(options), self_path_(self_path), activation_(std::move(activation)) {
  if (options.mode != "dispatch" && options.mode != "inherit") {
    throw UsageError("--mode " + options.mode + ": expected dispatch or inherit");
  }
  dispatch_mode_ = options.mode == "dispatch";
  if (activation_.status == systemd::ListenStatus::pid_mismatch ||
      activation_.status == systemd::ListenStatus::invalid) {
    // sd_listen_fds() would silently return 0 here; say why the listeners are not used.
    log::warn("socket-activation-ignored", "status={} reason={}",
              systemd::to_string(activation_.status), log::value(activation_.diagnostic));
  }
  const bool activated = activation_.status == systemd::ListenStatus::activated;
  if (!options.upgrade_from.empty()) {
    if (activated) {
      throw UsageError(
          "--upgrade-from takes the listeners from a running serve: not with "
          "socket activation (LISTEN_FDS) too");
    }
    upgrade_endpoint_ = upgrade_source(options.upgrade_from);
  }
  if (options.listen.empty() && !(activated && !activation_.sockets.empty()) &&
      options.upgrade_from.empty()) {
    throw UsageError(
        "at least one --listen is required (or listeners by socket activation: LISTEN_FDS, "
        "or --upgrade-from)");
  }
  if (options.workers == 0 || options.workers > 1024) throw UsageError("--workers: 1 to 1024");
  if (options.reuseport && dispatch_mode_) {
    throw UsageError("--reuseport gives each worker its own listener: it needs --mode inherit");
  }
  if (!dispatch_mode_ && !options.policy.empty()) {
    throw UsageError("--policy needs --mode dispatch: in inherit mode the kernel picks the worker");
  }
  // Least loaded by default: it routes around a worker busy on a long request, which is what
  // a dispatcher is for, and costs no more than round robin (docs/benchmarks/serve.md).
  policy_ = options.policy.empty() ? "least" : options.policy;
  if (!dispatch_mode_ && options.peek_bytes > 0)
    throw UsageError("--peek-bytes needs --mode dispatch");
  if (!dispatch_mode_ && options.max_attempts)
    throw UsageError("--max-attempts needs --mode dispatch");
  if (!(options.drain_timeout_s >= 0 && options.drain_timeout_s <= 3600)) {
    throw UsageError("--drain-timeout: 0 to 3600 seconds");
  }
  if (!(options.ready_timeout_s > 0 && options.ready_timeout_s <= 3600)) {
    throw UsageError("--ready-timeout: more than 0, at most 3600 seconds");
  }
  specs_ = parse_listeners(options.listen);
  dispatcher_options_.policy = parse_policy(policy_);
  dispatcher_options_.max_in_flight = options.max_in_flight == 0 ? 1 : options.max_in_flight;
  dispatcher_options_.peek_bytes = options.peek_bytes;
  if (options.max_attempts) dispatcher_options_.max_attempts = *options.max_attempts;
  if (!options.control.empty()) {
    try {
      const Endpoint control = parse_endpoint(options.control);
      if (control.kind != Endpoint::Kind::unix_path &&
          control.kind != Endpoint::Kind::unix_abstract) {
        throw UsageError("--control " + options.control + ": must be unix:/path or unix:@name");
      }
    } catch (const Error& e) {
      throw UsageError("--control " + options.control + ": " + e.what());
    }
  }
  if (options.ready_fd >= 0) {
    // The readiness descriptor is for our parent only: no worker may inherit it. Non-blocking:
    // reload lines follow the first "ready", and a parent that stopped reading must not stall
    // the loop once the pipe is full.
    if (::fcntl(options.ready_fd, F_SETFD, FD_CLOEXEC) != 0) {
      throw UsageError("--ready-fd " + std::to_string(options.ready_fd) +
                       ": not an open descriptor");
    }
    const int flags = ::fcntl(options.ready_fd, F_GETFL);
    if (flags >= 0) ::fcntl(options.ready_fd, F_SETFL, flags | O_NONBLOCK);
    ready_ = Fd(options.ready_fd);
  }
}

Serve::~Serve() {
  stop_handoff();
  control_.reset();
  while (!generations_.empty()) generations_.pop_back();
}

void Serve::open_listeners() {
  // Socket activation first: an inherited listener is used for the --listen of the same name
  // (or, failing that, the same address); without --listen every inherited one is used.
  std::vector<bool> taken(activation_.sockets.size(), false);
  if (specs_.empty()) {
    for (std::size_t i = 0; i < activation_.sockets.size(); ++i) {
      ListenSpec spec;
      const std::string& name = activation_.sockets[i].name;
      spec.name = valid_name(name) && name != "unknown"
                      ? name
                      : (i == 0 ? "http" : "http" + std::to_string(i));
      for (const auto& other : specs_) {
        if (other.name == spec.name) spec.name += "-" + std::to_string(i);
      }
      specs_.push_back(std::move(spec));
    }
  }
  for (std::size_t s = 0; s < specs_.size(); ++s) {
    ListenSpec& spec = specs_[s];
    Fd socket;
    for (std::size_t round = 0; round < 2 && !socket.valid(); ++round) {
      for (std::size_t i = 0; i < activation_.sockets.size(); ++i) {
        if (taken[i]) continue;
        auto& inherited = activation_.sockets[i];
        bool match = false;
        if (options_.listen.empty()) {
          match = i == s;
        } else if (round == 0) {
          match = inherited.name == spec.name;
        } else {
          try {
            match = local_endpoint(inherited.fd.borrow()).to_string() == spec.endpoint.to_string();
          } catch (const Error&) {
            match = false;
          }
        }
        if (!match) continue;
        if (auto why = mismatch(inherited.identity, Expect::stream_listener)) {
          throw Error(ErrorKind::invalid_input, 0,
                      "inherited descriptor " + std::to_string(systemd::kListenFdsStart + i) +
                          " (" + inherited.name + ")",
                      *why);
        }
        taken[i] = true;
        socket = std::move(inherited.fd);
        if (upgrade_) {
          log::info("listener-taken", "name={} from_pid={}", spec.name, upgraded_from_);
        } else {
          log::info("socket-activation", "name={} fd={}", spec.name,
                    systemd::kListenFdsStart + static_cast<int>(i));
        }
        break;
      }
    }
    const bool from_manager = socket.valid();
    const bool inet = from_manager ? identify(socket.borrow()).family != AF_UNIX
                                   : (spec.endpoint.kind == Endpoint::Kind::inet ||
                                      spec.endpoint.kind == Endpoint::Kind::inet6);
    if (!from_manager) {
      ListenOptions listen_options;
      listen_options.reuse_port = !dispatch_mode_ && options_.reuseport && inet;
      listen_options.defer_accept = std::chrono::seconds(
          options_.defer_accept_s >= 0 ? options_.defer_accept_s : options_.command.empty() ? 1 : 0);
      socket = listen_on(spec.endpoint, listen_options);
    }
    Endpoint actual = spec.endpoint;
    if (inet || from_manager) actual = local_endpoint(socket.borrow());
    if (from_manager) spec.endpoint = actual;
    bound_.push_back(actual);
    defer_accept_.push_back(defer_accept_of(socket.borrow()));  // socket activation's too
    if (dispatch_mode_) {
      // Our own copy for the next serve's upgrade: the dispatcher closes its copy at drain.
      const int copy = ::fcntl(socket.get(), F_DUPFD_CLOEXEC, 3);
      if (copy < 0) sys::throw_errno("fcntl(F_DUPFD_CLOEXEC) of listener " + spec.name);
      handoff_copies_.emplace_back(copy);
      if (upgrade_) {
        deferred_listeners_.emplace_back(spec.name, std::move(socket));
      } else {
        dispatcher_->add_listener(spec.name, std::move(socket));
      }
    } else {
      inherit_sockets_.push_back(std::move(socket));
    }
  }
  for (std::size_t i = 0; i < activation_.sockets.size(); ++i) {
    if (taken[i]) continue;
    log::warn("socket-activation-unused",
              "name={} fd={} reason=\"no --listen of that name or "
              "address\"",
              log::value(activation_.sockets[i].name),
              systemd::kListenFdsStart + static_cast<int>(i));
    activation_.sockets[i].fd.reset();
  }
}

InheritListener Serve::inherit_copy(std::size_t i) const {
  InheritListener inherit;
  inherit.name = specs_[i].name;
  // A copy per generation: a generation's supervisor closes its copies when it finishes,
  // while the socket (and its accept queue) lives on in ours and the next generation's.
  const int copy = ::fcntl(inherit_sockets_[i].get(), F_DUPFD_CLOEXEC, 3);
  if (copy < 0) sys::throw_errno("fcntl(F_DUPFD_CLOEXEC) of listener " + specs_[i].name);
  inherit.socket = Fd(copy);
  inherit.endpoint = bound_[i];
  return inherit;
}

Generation& Serve::start_generation() {
  auto g = std::make_unique<Generation>();
  g->number = next_generation_++;
  SupervisorOptions supervisor_options;
  if (options_.command.empty()) {
    supervisor_options.argv = {self_path_, "__worker"};
  } else {
    supervisor_options.argv = options_.command;
  }
  supervisor_options.workers = options_.workers;
  supervisor_options.mode = dispatch_mode_ ? WorkerMode::dispatch : WorkerMode::inherit;
  if (!dispatch_mode_) {
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      supervisor_options.listeners.push_back(inherit_copy(i));
    }
  }
  supervisor_options.reuse_port_per_worker = options_.reuseport;
  // Later generations share the listeners with workers still running: the first one's
  // blocking mode stays (R14).
  supervisor_options.set_listeners_blocking = g->number == 1 && !upgrade_;
  supervisor_options.env.push_back("SOCKSHARE_GENERATION=" + std::to_string(g->number));
  g->supervisor = std::make_unique<Supervisor>(*dispatcher_, std::move(supervisor_options));
  const std::uint32_t number = g->number;
  g->supervisor->on_event = [this, number](const SupervisorEvent& event) {
    on_supervisor_event(number, event);
  };
  generations_.push_back(std::move(g));
  Generation& added = *generations_.back();
  added.started_at = std::chrono::steady_clock::now();
  added.supervisor->start();
  return added;
}

void Serve::sd_notify(std::string_view what, const std::function<bool()>& send) {
  try {
    send();
  } catch (const Error& e) {
    // The service manager is an observer here: failing to tell it must not stop serving.
    log::warn("sd-notify-failed", "state={} error={}", what, log::value(e.what()));
  }
}

void Serve::ready_line(const std::string& lines) {
  if (ready_.valid()) write_all(ready_.get(), lines);
}

bool Serve::retired(std::uint32_t generation) const {
  for (const auto& g : generations_) {
    if (g->number == generation) return g->state == Generation::State::retired;
  }
  return false;
}

Generation* Serve::serving() {
  for (auto it = generations_.rbegin(); it != generations_.rend(); ++it) {
    if ((*it)->state == Generation::State::serving) return it->get();
  }
  return nullptr;
}

bool Serve::all_finished() const {
  for (const auto& g : generations_) {
    if (!g->supervisor->finished()) return false;
  }
  return true;
}

void Serve::on_signal() {
  signalfd_siginfo info{};
  while (sys::retry_eintr([&] { return ::read(signals_.get(), &info, sizeof info); }) ==
         static_cast<ssize_t>(sizeof info)) {
    if (info.ssi_signo == SIGHUP) {
      request_reload({});
      continue;
    }
    const char* name = info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT";
    if (!stopping_) {
      const auto grace =
          std::chrono::milliseconds(static_cast<std::int64_t>(options_.drain_timeout_s * 1000.0));
      log::info("shutdown", "signal={} drain_timeout_ms={}", name, grace.count());
      shutdown(grace);
    } else {
      log::warn("shutdown-forced", "signal={}", name);
      shutdown(0ms);
    }
  }
}

void Serve::shutdown(std::chrono::milliseconds grace) {
  if (!stopping_) {
    stopping_ = true;
    // No upgrade of a server that is going away, and our copies of the listeners must not
    // keep the port open once the dispatcher closed its own: clients are refused at once
    // rather than queued for a backlog nobody will accept from.
    stop_handoff();
    handoff_copies_.clear();
    sd_notify("STOPPING=1", [] { return systemd::notify_stopping("draining"); });
    for (auto& done : reload_waiters_) done(false, "serve is stopping");
    for (auto& done : queued_waiters_) done(false, "serve is stopping");
    reload_waiters_.clear();
    queued_waiters_.clear();
    reload_queued_ = false;
  }
  for (auto& g : generations_) {
    // Supervisor::shutdown drains the dispatcher (listeners closed, kDrain to every worker).
    g->supervisor->shutdown(grace);
  }
}

void Serve::on_supervisor_event(std::uint32_t generation, const SupervisorEvent& event) {
  switch (event.kind) {
    case SupervisorEvent::Kind::started:
      log::info(event_name(event.kind), "index={} pid={} generation={}", event.index, event.pid,
                generation);
      break;
    case SupervisorEvent::Kind::exited:
      // A worker we asked to stop may end by the SIGTERM it got (128 + 15), as programs
      // without a handler for it do: that is the expected end, not a failure.
      if ((stopping_ || retired(generation)) &&
          (event.exit_status == 0 || event.exit_status == 128 + SIGTERM)) {
        log::info(event_name(event.kind), "index={} pid={} generation={} status={}", event.index,
                  event.pid, generation, event.exit_status);
      } else {
        log::warn(event_name(event.kind), "index={} pid={} generation={} status={}", event.index,
                  event.pid, generation, event.exit_status);
      }
      break;
    case SupervisorEvent::Kind::restart_scheduled:
      log::info(event_name(event.kind), "index={} generation={} delay_ms={}", event.index,
                generation, event.delay.count());
      break;
    case SupervisorEvent::Kind::crash_loop:
      log::error(event_name(event.kind), "index={} pid={} generation={} status={} throttle_ms={}",
                 event.index, event.pid, generation, event.exit_status, event.delay.count());
      break;
    case SupervisorEvent::Kind::killed:
      log::warn(event_name(event.kind), "index={} pid={} generation={} reason=\"drain deadline\"",
                event.index, event.pid, generation);
      break;
    case SupervisorEvent::Kind::stopped:
      log::info(event_name(event.kind), "workers={} generation={}", options_.workers, generation);
      break;
  }
}

void Serve::request_reload(control::Server::Done done) {
  if (stopping_) {
    log::warn("reload-refused", "reason=\"serve is stopping\"");
    if (done) done(false, "serve is stopping");
    return;
  }
  const bool starting = std::any_of(generations_.begin(), generations_.end(), [](const auto& g) {
    return g->state == Generation::State::starting;
  });
  if (starting || !ready_sent_) {
    // One generation starts at a time; a request meanwhile becomes one more reload after it
    // (several requests meanwhile are one reload: they all want the newest configuration).
    reload_queued_ = true;
    if (done) queued_waiters_.push_back(std::move(done));
    log::info("reload-queued", "reason=\"a generation is starting\"");
    return;
  }
  if (done) reload_waiters_.push_back(std::move(done));
  begin_reload();
}

void Serve::begin_reload() {
  if (options_.reuseport) {
    // Each worker's SO_REUSEPORT listener belongs to its generation: closing the old ones
    // would reset the connections in their accept queues (R22), so no reload here.
    const std::string why =
        "--reuseport listeners belong to their workers; a reload would reset their queues";
    log::error("reload-failed", "reason={}", log::value(why));
    ++reloads_failed_;
    ready_line("reload-failed " + log::value(why) + "\n");
    for (auto& done : reload_waiters_) done(false, why);
    reload_waiters_.clear();
    return;
  }
  sd_notify("RELOADING=1", [] { return systemd::notify_reloading(); });
  try {
    Generation& g = start_generation();
    log::info("reload-started", "generation={} workers={}", g.number, options_.workers);
    sd_notify("STATUS", [&] {
      return systemd::notify_status("starting generation " + std::to_string(g.number));
    });
  } catch (const Error& e) {
    if (!generations_.empty() && generations_.back()->state == Generation::State::starting) {
      generations_.back()->supervisor->retire(0ms);
      finish_reload(*generations_.back(), false, e.what());
    } else {
      log::error("reload-failed", "error={}", log::value(e.what()));
      for (auto& done : reload_waiters_) done(false, e.what());
      reload_waiters_.clear();
      ++reloads_failed_;
      ready_line("reload-failed " + log::value(e.what()) + "\n");
      sd_notify("READY=1", [] { return systemd::notify_ready("reload failed"); });
    }
  }
}

bool Serve::generation_ready(const Generation& g) const {
  const std::vector<WorkerStatus> slots = g.supervisor->status();
  if (slots.size() < options_.workers) return false;
  if (dispatch_mode_) {
    // Ready once each of its workers said hello: from then on connections reach it.
    const std::vector<dispatch::WorkerView> views = dispatcher_->workers();
    for (const auto& w : slots) {
      if (!w.running || w.worker_id == 0) return false;
      const bool hello = std::any_of(views.begin(), views.end(),
                                     [&](const auto& v) { return v.id == w.worker_id && v.ready; });
      if (!hello) return false;
    }
    return true;
  }
  for (const auto& w : slots) {
    if (!w.running) return false;
  }
  // Inherit mode: the first generation is ready once spawned (the kernel's backlog holds
  // clients until a worker accepts); a later one must also outlive a short window, because
  // the generation it replaces is told to stop once it is ready.
  if (g.number == 1) return true;
  return std::chrono::steady_clock::now() - g.started_at >= kInheritReadyWindow;
}

void Serve::check_generations() {
  if (stopping_) return;
  const auto now = std::chrono::steady_clock::now();
  for (auto& owned : generations_) {
    Generation& g = *owned;
    if (g.state != Generation::State::starting) continue;
    if (generation_ready(g)) {
      finish_reload(g, true, {});
      continue;
    }
    // The first generation keeps restarting with backoff, since nothing else serves; unless
    // this is an upgrade, where the serve we take over from still does.
    if (g.number == 1 && !upgrade_) continue;
    // A worker of a new generation that exits before it is ready fails the reload at once
    // (haproxy #1883: the old generation must keep serving), as does a slow start.
    std::string why;
    for (const auto& w : g.supervisor->status()) {
      if (w.exits > 0) {
        why = fmt::format("worker {} exited with status {} before it was ready", w.index,
                          w.last_exit_status);
        break;
      }
    }
    const auto limit =
        std::chrono::milliseconds(static_cast<std::int64_t>(options_.ready_timeout_s * 1000.0));
    if (why.empty() && now - g.started_at >= limit) {
      why = fmt::format("not ready within {} ms", limit.count());
    }
    if (!why.empty()) finish_reload(g, false, why);
  }
}

void Serve::finish_reload(Generation& g, bool ok, const std::string& why) {
  std::string pids;
  for (const auto& w : g.supervisor->status()) {
    if (!pids.empty()) pids += ',';
    pids += std::to_string(w.pid);
  }
  if (g.number == 1 && upgrade_) {
    finish_upgrade(ok, why);
    if (!ok) {
      g.state = Generation::State::failed;
      return;
    }
  }
  if (g.number == 1 && ok) {
    g.state = Generation::State::serving;
    ready_sent_ = true;
    log::info("ready", "workers={} mode={} generation=1 control={}", options_.workers,
              options_.mode, control_->endpoint().to_string());
    std::string lines;
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      lines += "listening " + specs_[i].name + " " + bound_[i].to_string() + "\n";
    }
    lines += "control " + control_->endpoint().to_string() + "\n";
    lines += "generation 1 pids " + pids + "\n";
    if (upgraded_from_ != 0) lines += "upgraded-from " + std::to_string(upgraded_from_) + "\n";
    lines += "ready\n";
    ready_line(lines);
    sd_notify("READY=1", [&] {
      return systemd::notify_ready(
          fmt::format("serving: generation 1, {} workers, pid {}", options_.workers, ::getpid()));
    });
  } else if (ok) {
    Generation* old = serving();
    g.state = Generation::State::serving;
    ++reloads_ok_;
    const auto grace =
        std::chrono::milliseconds(static_cast<std::int64_t>(options_.drain_timeout_s * 1000.0));
    if (old != nullptr) {
      old->state = Generation::State::retired;
      old->supervisor->retire(grace);
      log::info("generation-draining", "generation={} drain_timeout_ms={}", old->number,
                grace.count());
    }
    log::info("reloaded", "generation={} workers={} pids={}", g.number, options_.workers, pids);
    ready_line(fmt::format("reloaded generation {} pids {}\n", g.number, pids));
    sd_notify("READY=1", [&] {
      return systemd::notify_ready(
          fmt::format("serving: generation {}, {} workers", g.number, options_.workers));
    });
    for (auto& done : reload_waiters_) done(true, fmt::format("generation {} ready", g.number));
  } else {
    g.state = Generation::State::failed;
    ++reloads_failed_;
    g.supervisor->retire(kFailedGenerationGrace);
    const Generation* old = serving();
    const std::uint32_t still = old != nullptr ? old->number : 0;
    log::error("reload-failed", "generation={} reason={} serving_generation={}", g.number,
               log::value(why), still);
    ready_line(fmt::format("reload-failed generation {} serving {}\n", g.number, still));
    sd_notify("READY=1", [&] {
      return systemd::notify_ready(
          fmt::format("reload to generation {} failed; generation {} serving", g.number, still));
    });
    for (auto& done : reload_waiters_) {
      done(false, fmt::format("generation {} failed: {}; generation {} still serving", g.number,
                              why, still));
    }
  }
  reload_waiters_.clear();
  if (reload_queued_ && !stopping_) {
    reload_queued_ = false;
    reload_waiters_ = std::move(queued_waiters_);
    queued_waiters_.clear();
    begin_reload();
  }
}

int Serve::run() {
  // SIGPIPE: every send uses MSG_NOSIGNAL; ignoring it also covers what we do not control.
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) sys::throw_errno("sigprocmask(SIG_BLOCK)");
  signals_ = Fd(::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signals_.valid()) sys::throw_errno("signalfd");

  dispatcher_options_.log = [](std::string_view line) {
    log::info("dispatcher", "message={}", log::value(line));
  };
  dispatcher_.emplace(dispatcher_options_);
  if (!options_.upgrade_from.empty()) take_over();
  open_listeners();

  const Endpoint control_endpoint = options_.control.empty()
                                        ? control::default_endpoint(::getpid(), true)
                                        : parse_endpoint(options_.control);
  control::remove_stale_socket(control_endpoint);
  control_.emplace(
      *dispatcher_, ChannelListener::listen(control_endpoint),
      [this](std::string_view format) { return render(format); },
      [this](control::Server::Done done) { request_reload(std::move(done)); });

  dispatcher_->watch(signals_.borrow(), EPOLLIN, [this](std::uint32_t) { on_signal(); });
  offer_handoff(control_endpoint);

  Generation& first = start_generation();
  if (!dispatch_mode_ && options_.reuseport) {
    const std::vector<Endpoint> endpoints = first.supervisor->listener_endpoints();
    for (std::size_t i = 0; i < endpoints.size() && i < bound_.size(); ++i)
      bound_[i] = endpoints[i];
  }
  for (std::size_t i = 0; i < specs_.size(); ++i) {
    log::info("listening", "name={} endpoint={} mode={}{} defer_accept_s={}", specs_[i].name,
              log::value(bound_[i].to_string()), options_.mode,
              options_.reuseport ? " reuseport=per-worker" : "", defer_accept_[i].count());
  }
  log::info("control", "endpoint={}", log::value(control_->endpoint().to_string()));
  log::info("started", "pid={} workers={} mode={} policy={} worker={}", ::getpid(),
            options_.workers, options_.mode, dispatch_mode_ ? policy_ : "kernel",
            log::value(options_.command.empty() ? std::string("built-in") : options_.command[0]));

  while (!(stopping_ && all_finished())) {
    auto at = std::chrono::steady_clock::now() + 200ms;
    for (const auto& g : generations_) at = std::min(at, g->supervisor->next_timer());
    const auto wait = std::max(
        0ms, std::chrono::ceil<std::chrono::milliseconds>(at - std::chrono::steady_clock::now()));
    dispatcher_->run_once(wait);
    for (std::size_t i = 0; i < generations_.size(); ++i) generations_[i]->supervisor->run_timers();
    check_generations();
  }
  const dispatch::Stats stats = dispatcher_->stats();
  dispatcher_->unwatch(signals_.borrow());
  stop_handoff();
  control_.reset();
  log::info("stopped", "accepted={} acknowledged={} dropped={} generations={}", stats.accepted,
            stats.acknowledged, stats.dropped, next_generation_ - 1);
  return exit_status_;
}

void Serve::take_over() {
  handoff::TakeOptions take;
  take.timeout = 10s;
  try {
    upgrade_.emplace(handoff::HandoffClient::connect(upgrade_endpoint_, take));
    handoff::Takeover takeover = upgrade_->receive();
    upgraded_from_ = upgrade_->holder_pid();
    activation_.status = systemd::ListenStatus::activated;
    activation_.sockets.clear();
    for (auto& l : takeover.listeners) {
      systemd::InheritedSocket inherited{std::move(l.fd), l.meta.name, l.identity};
      activation_.sockets.push_back(std::move(inherited));
    }
    log::info("upgrade-received", "from_pid={} listeners={} handoff={}", upgraded_from_,
              activation_.sockets.size(), log::value(upgrade_endpoint_.to_string()));
  } catch (const Error& e) {
    if (upgrade_) upgrade_->abort(e.what());
    throw Error(e.kind(), e.code(), "upgrade from " + upgrade_endpoint_.to_string(), e.what());
  }
}

void Serve::finish_upgrade(bool ok, const std::string& why) {
  if (!ok) {
    // The serve we came to replace keeps serving: it sees the abort (or our exit) as a
    // failed handoff. Our workers took no connection in dispatch mode (nothing accepted yet).
    log::error("upgrade-failed", "from_pid={} reason={}", upgraded_from_, log::value(why));
    upgrade_->abort(why);
    upgrade_.reset();
    ready_line("upgrade-failed " + log::value(why) + "\n");
    exit_status_ = 1;
    shutdown(0ms);
    return;
  }
  // Accept first, then release the old one: the listening sockets never go unserved.
  for (auto& [name, socket] : deferred_listeners_)
    dispatcher_->add_listener(name, std::move(socket));
  deferred_listeners_.clear();
  bool released = false;
  try {
    released = upgrade_->commit();
  } catch (const Error& e) {
    log::warn("upgrade-commit", "error={}", log::value(e.what()));
  }
  upgrade_.reset();
  // The old serve leaves every path alone once it handed over (the new one might use it);
  // its handoff socket file is nobody's now.
  if (upgrade_endpoint_.kind == Endpoint::Kind::unix_path) ::unlink(upgrade_endpoint_.path.c_str());
  log::info("upgraded", "from_pid={} released={}", upgraded_from_, released ? "yes" : "no");
  // Under a service manager the main process changes (NotifyAccess=all needed).
  sd_notify("MAINPID", [] { return systemd::notify_main_pid(::getpid()); });
}

void Serve::offer_handoff(const Endpoint& control) {
  const Endpoint endpoint = handoff_endpoint(control);
  handoff::HandoffServerOptions offer;
  // The taker starts its workers between receiving the listeners and its ack.
  offer.exchange_timeout =
      std::chrono::milliseconds(static_cast<std::int64_t>(options_.ready_timeout_s * 1000.0)) + 5s;
  // Each serve offers at its own address (next to its own control socket).
  offer.hand_over_control = false;
  offer.on_handed_over = [this] {
    const std::uint64_t one = 1;
    (void)!::write(handoff_event_.get(), &one, sizeof one);
  };
  try {
    handoff_.emplace(handoff::HandoffServer::listen(endpoint, offer));
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      const Fd& socket = dispatch_mode_ ? handoff_copies_[i] : inherit_sockets_[i];
      handoff_->add(specs_[i].name, socket.borrow());
    }
  } catch (const Error& e) {
    // Serving matters more than being upgradable; say why the next serve cannot take over.
    log::warn("upgrade-unavailable", "handoff={} error={}", log::value(endpoint.to_string()),
              log::value(e.what()));
    handoff_.reset();
    return;
  }
  handoff_event_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!handoff_event_.valid()) sys::throw_errno("eventfd");
  dispatcher_->watch(handoff_event_.borrow(), EPOLLIN, [this](std::uint32_t) { on_handed_over(); });
  log::info("handoff", "endpoint={}", log::value(endpoint.to_string()));
  handoff_thread_ = std::thread([this] {
    while (!handoff_stop_.load()) {
      handoff::ServeOutcome outcome;
      try {
        outcome = handoff_->serve(200ms);
      } catch (const Error& e) {
        log::error("handoff-failed", "error={}", log::value(e.what()));
        return;
      }
      if (outcome.result == handoff::ServeResult::handed_over) {
        handed_to_.store(outcome.taker_pid);
        return;
      }
      if (outcome.result != handoff::ServeResult::idle) {
        log::warn("upgrade-refused", "result={} taker_pid={} detail={}",
                  handoff::to_string(outcome.result), outcome.taker_pid,
                  log::value(outcome.detail));
      }
    }
  });
}

void Serve::on_handed_over() {
  std::uint64_t count = 0;
  (void)!::read(handoff_event_.get(), &count, sizeof count);
  if (stopping_) return;
  const auto grace =
      std::chrono::milliseconds(static_cast<std::int64_t>(options_.drain_timeout_s * 1000.0));
  log::info("handed-over", "to_pid={} drain_timeout_ms={}", handed_to_.load(), grace.count());
  ready_line("handed-over\n");
  // Not STOPPING=1: for a service manager the service goes on, in the new process.
  stopping_ = true;
  for (auto& done : reload_waiters_) done(false, "serve was upgraded");
  for (auto& done : queued_waiters_) done(false, "serve was upgraded");
  reload_waiters_.clear();
  queued_waiters_.clear();
  reload_queued_ = false;
  for (auto& g : generations_) g->supervisor->shutdown(grace);
}

void Serve::stop_handoff() {
  handoff_stop_.store(true);
  if (handoff_thread_.joinable()) handoff_thread_.join();
  if (handoff_event_.valid()) {
    dispatcher_->unwatch(handoff_event_.borrow());
    handoff_event_.reset();
  }
  handoff_.reset();
}

std::string Serve::render(std::string_view format) const {
  return format == "prometheus" ? render_prometheus() : render_text();
}

std::string Serve::render_text() const {
  std::string out;
  const auto uptime = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_);
  out += fmt::format("sockshare serve, pid {}, up {:.1f} s, mode {}, {}\n", ::getpid(),
                     uptime.count(), options_.mode,
                     dispatch_mode_
                         ? "policy " + policy_
                         : std::string(options_.reuseport ? "one SO_REUSEPORT listener per worker"
                                                          : "one shared listener"));
  for (std::size_t i = 0; i < specs_.size(); ++i) {
    out += fmt::format("listener {:<10} {}{}\n", specs_[i].name, bound_[i].to_string(),
                       defer_accept_[i].count() > 0
                           ? fmt::format("  deferred accept {} s", defer_accept_[i].count())
                           : std::string());
  }
  std::vector<dispatch::WorkerView> views;
  if (dispatch_mode_) views = dispatcher_->workers();
  out += fmt::format("reloads      ok {}  failed {}\n", reloads_ok_, reloads_failed_);
  for (const auto& g : generations_) {
    if (g->supervisor->finished()) continue;
    out += fmt::format("generation {} {}\n", g->number, state_name(g->state));
    for (const WorkerStatus& w : g->supervisor->status()) {
      std::string line =
          fmt::format("worker {:<3} pid {:<8} {:<10} starts {} exits {} generation {}", w.index,
                      w.pid, w.running ? "running" : "restarting", w.starts, w.exits, g->number);
      if (w.last_exit_status >= 0) line += fmt::format(" last-exit {}", w.last_exit_status);
      if (w.crash_looping) line += " CRASH-LOOP";
      for (const auto& v : views) {
        if (v.id == w.worker_id && w.worker_id != 0) {
          line += fmt::format(" in-flight {} load {}{}", v.in_flight, v.reported_load, v.busy ? " busy" : "");
        }
      }
      out += line + "\n";
    }
  }
  if (dispatch_mode_) {
    const dispatch::Stats s = dispatcher_->stats();
    out += fmt::format(
        "connections  accepted {}  dispatched {}  acknowledged {}  redispatched {}  dropped {}  "
        "abandoned {}\n",
        s.accepted, s.dispatched, s.acknowledged, s.redispatched, s.dropped, s.abandoned);
    out += fmt::format("now          in-flight {}  pending {}  workers {}  joined {}  lost {}\n",
                       s.in_flight, s.pending, s.workers, s.workers_joined, s.workers_lost);
    out += fmt::format(
        "trouble      accept-errors {}  emfile {}  backpressure-pauses {}  worker-protocol-errors "
        "{}"
        "  rejected-batches {}  peek-timeouts {}\n",
        s.accept_errors, s.emfile_events, s.backpressure_pauses, s.worker_protocol_errors,
        s.rejected_batches, s.peek_timeouts);
    std::uint64_t total = 0;
    for (auto c : s.latency_counts) total += c;
    out += fmt::format("handoff      {} samples  mean {:.1f} us  p50 {}  p90 {}  p99 {}\n", total,
                       total > 0 ? s.latency_sum_us / static_cast<double>(total) : 0.0,
                       quantile(s, 0.50), quantile(s, 0.90), quantile(s, 0.99));
  }
  return out;
}

std::string Serve::render_prometheus() const {
  std::string out;
  if (dispatch_mode_) out += dispatcher_->stats().prometheus();
  std::vector<WorkerStatus> workers;
  std::uint32_t generation = 0;
  for (const auto& g : generations_) {
    if (g->state == Generation::State::serving) {
      workers = g->supervisor->status();
      generation = g->number;
    }
  }
  out +=
      "# HELP sockshare_serve_generation The generation of workers serving now.\n"
      "# TYPE sockshare_serve_generation gauge\n";
  out += fmt::format("sockshare_serve_generation {}\n", generation);
  out +=
      "# HELP sockshare_serve_reloads_total Reloads by outcome.\n"
      "# TYPE sockshare_serve_reloads_total counter\n";
  out += fmt::format("sockshare_serve_reloads_total{{result=\"ok\"}} {}\n", reloads_ok_);
  out += fmt::format("sockshare_serve_reloads_total{{result=\"failed\"}} {}\n", reloads_failed_);
  out +=
      "# HELP sockshare_supervisor_workers_configured Worker processes the supervisor keeps "
      "running.\n"
      "# TYPE sockshare_supervisor_workers_configured gauge\n";
  out += fmt::format("sockshare_supervisor_workers_configured {}\n", options_.workers);
  out +=
      "# HELP sockshare_supervisor_worker_up 1 while the worker process of a slot runs.\n"
      "# TYPE sockshare_supervisor_worker_up gauge\n";
  for (const auto& w : workers) {
    out += fmt::format("sockshare_supervisor_worker_up{{index=\"{}\"}} {}\n", w.index,
                       w.running ? 1 : 0);
  }
  out +=
      "# HELP sockshare_supervisor_worker_starts_total Processes started per worker slot.\n"
      "# TYPE sockshare_supervisor_worker_starts_total counter\n";
  for (const auto& w : workers) {
    out += fmt::format("sockshare_supervisor_worker_starts_total{{index=\"{}\"}} {}\n", w.index,
                       w.starts);
  }
  out +=
      "# HELP sockshare_supervisor_worker_exits_total Worker process exits per slot.\n"
      "# TYPE sockshare_supervisor_worker_exits_total counter\n";
  for (const auto& w : workers) {
    out += fmt::format("sockshare_supervisor_worker_exits_total{{index=\"{}\"}} {}\n", w.index,
                       w.exits);
  }
  out +=
      "# HELP sockshare_supervisor_worker_crash_looping 1 while a slot is throttled as a crash "
      "loop.\n"
      "# TYPE sockshare_supervisor_worker_crash_looping gauge\n";
  for (const auto& w : workers) {
    out += fmt::format("sockshare_supervisor_worker_crash_looping{{index=\"{}\"}} {}\n", w.index,
                       w.crash_looping ? 1 : 0);
  }
  return out;
}

}  // namespace

int run_serve(const ServeOptions& options, const std::string& self_path) {
  // Before anything else: it reads and clears LISTEN_* (no worker may believe the
  // descriptors are meant for it) and owns descriptors 3.. only when they are ours.
  systemd::ListenFds activation = systemd::listen_fds_from_environment();
  Serve serve(options, self_path, std::move(activation));  // UsageError: exit status 2
  try {
    return serve.run();
  } catch (const std::exception& e) {
    log::error("failed", "error={}", log::value(e.what()));
    return 1;
  }
}

}  // namespace sockshare::cli
