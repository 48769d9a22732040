#include "serve.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "control.hpp"
#include "linux/sys.hpp"
#include "log.hpp"
#include "sockshare/dispatch.hpp"
#include "sockshare/error.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/supervisor.hpp"

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

class Serve {
 public:
  Serve(const ServeOptions& options, const std::string& self_path);
  int run();

 private:
  std::vector<InheritListener> open_listeners();
  void on_signal();
  void on_supervisor_event(const SupervisorEvent& event);
  void check_ready();
  std::string render(std::string_view format) const;
  std::string render_text() const;
  std::string render_prometheus() const;

  const ServeOptions& options_;
  std::string self_path_;
  std::vector<ListenSpec> specs_;
  std::vector<Endpoint> bound_;  // what each listener actually got (port 0 resolved)
  bool dispatch_mode_ = true;
  dispatch::DispatcherOptions dispatcher_options_;
  std::optional<dispatch::Dispatcher> dispatcher_;
  std::optional<Supervisor> supervisor_;
  std::optional<control::Server> control_;
  Fd signals_;
  Fd ready_;
  std::uint32_t started_ = 0;
  bool ready_sent_ = false;
  bool stopping_ = false;
  std::chrono::steady_clock::time_point start_time_ = std::chrono::steady_clock::now();
};

Serve::Serve(const ServeOptions& options, const std::string& self_path)
    : options_(options), self_path_(self_path) {
  if (options.mode != "dispatch" && options.mode != "inherit") {
    throw UsageError("--mode " + options.mode + ": expected dispatch or inherit");
  }
  dispatch_mode_ = options.mode == "dispatch";
  if (options.listen.empty()) throw UsageError("at least one --listen is required");
  if (options.workers == 0 || options.workers > 1024) throw UsageError("--workers: 1 to 1024");
  if (options.reuseport && dispatch_mode_) {
    throw UsageError("--reuseport gives each worker its own listener: it needs --mode inherit");
  }
  if (!dispatch_mode_ && options.policy != "rr") {
    throw UsageError("--policy needs --mode dispatch: in inherit mode the kernel picks the worker");
  }
  if (!dispatch_mode_ && options.peek_bytes > 0)
    throw UsageError("--peek-bytes needs --mode dispatch");
  if (!(options.drain_timeout_s >= 0 && options.drain_timeout_s <= 3600)) {
    throw UsageError("--drain-timeout: 0 to 3600 seconds");
  }
  specs_ = parse_listeners(options.listen);
  dispatcher_options_.policy = parse_policy(options.policy);
  dispatcher_options_.max_in_flight = options.max_in_flight == 0 ? 1 : options.max_in_flight;
  dispatcher_options_.peek_bytes = options.peek_bytes;
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
    // The readiness descriptor is for our parent only: no worker may inherit it.
    if (::fcntl(options.ready_fd, F_SETFD, FD_CLOEXEC) != 0) {
      throw UsageError("--ready-fd " + std::to_string(options.ready_fd) +
                       ": not an open descriptor");
    }
    ready_ = Fd(options.ready_fd);
  }
}

std::vector<InheritListener> Serve::open_listeners() {
  std::vector<InheritListener> inherited;
  for (const auto& spec : specs_) {
    ListenOptions listen_options;
    const bool inet =
        spec.endpoint.kind == Endpoint::Kind::inet || spec.endpoint.kind == Endpoint::Kind::inet6;
    listen_options.reuse_port = !dispatch_mode_ && options_.reuseport && inet;
    Fd socket = listen_on(spec.endpoint, listen_options);
    Endpoint actual = spec.endpoint;
    if (inet) actual = local_endpoint(socket.borrow());
    bound_.push_back(actual);
    if (dispatch_mode_) {
      dispatcher_->add_listener(spec.name, std::move(socket));
    } else {
      InheritListener inherit;
      inherit.name = spec.name;
      inherit.socket = std::move(socket);
      inherit.endpoint = actual;
      inherited.push_back(std::move(inherit));
    }
  }
  return inherited;
}

void Serve::on_signal() {
  signalfd_siginfo info{};
  while (sys::retry_eintr([&] { return ::read(signals_.get(), &info, sizeof info); }) ==
         static_cast<ssize_t>(sizeof info)) {
    if (info.ssi_signo == SIGHUP) {
      // The supervisor has no generation switch yet; say so rather than half-reload.
      log::warn("reload-unsupported", "signal=SIGHUP action=ignored");
      continue;
    }
    const char* name = info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT";
    if (!stopping_) {
      stopping_ = true;
      const auto grace =
          std::chrono::milliseconds(static_cast<std::int64_t>(options_.drain_timeout_s * 1000.0));
      log::info("shutdown", "signal={} drain_timeout_ms={}", name, grace.count());
      supervisor_->shutdown(grace);
    } else {
      log::warn("shutdown-forced", "signal={}", name);
      supervisor_->shutdown(0ms);
    }
  }
}

void Serve::on_supervisor_event(const SupervisorEvent& event) {
  switch (event.kind) {
    case SupervisorEvent::Kind::started:
      ++started_;
      log::info(event_name(event.kind), "index={} pid={}", event.index, event.pid);
      break;
    case SupervisorEvent::Kind::exited:
      if (stopping_ && event.exit_status == 0) {
        log::info(event_name(event.kind), "index={} pid={} status={}", event.index, event.pid,
                  event.exit_status);
      } else {
        log::warn(event_name(event.kind), "index={} pid={} status={}", event.index, event.pid,
                  event.exit_status);
      }
      break;
    case SupervisorEvent::Kind::restart_scheduled:
      log::info(event_name(event.kind), "index={} delay_ms={}", event.index, event.delay.count());
      break;
    case SupervisorEvent::Kind::crash_loop:
      log::error(event_name(event.kind), "index={} pid={} status={} throttle_ms={}", event.index,
                 event.pid, event.exit_status, event.delay.count());
      break;
    case SupervisorEvent::Kind::killed:
      log::warn(event_name(event.kind), "index={} pid={} reason=\"drain deadline\"", event.index,
                event.pid);
      break;
    case SupervisorEvent::Kind::stopped:
      log::info(event_name(event.kind), "workers={}", options_.workers);
      break;
  }
}

void Serve::check_ready() {
  if (ready_sent_ || stopping_) return;
  // Dispatch mode: ready once every worker said hello, so the first requests already spread
  // as the policy says. Inherit mode: once every worker is spawned; the kernel's backlog
  // holds clients until a worker accepts.
  std::uint32_t up = started_;
  if (dispatch_mode_) {
    up = 0;
    for (const auto& view : dispatcher_->workers()) up += view.ready ? 1 : 0;
  }
  if (up < options_.workers) return;
  ready_sent_ = true;
  log::info("ready", "workers={} mode={} control={}", options_.workers, options_.mode,
            control_->endpoint().to_string());
  if (ready_.valid()) {
    std::string lines;
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      lines += "listening " + specs_[i].name + " " + bound_[i].to_string() + "\n";
    }
    lines += "control " + control_->endpoint().to_string() + "\nready\n";
    write_all(ready_.get(), lines);
    ready_.reset();
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
  std::vector<InheritListener> inherited = open_listeners();

  const Endpoint control_endpoint = options_.control.empty()
                                        ? control::default_endpoint(::getpid(), true)
                                        : parse_endpoint(options_.control);
  control::remove_stale_socket(control_endpoint);
  control_.emplace(*dispatcher_, ChannelListener::listen(control_endpoint),
                   [this](std::string_view format) { return render(format); });

  SupervisorOptions supervisor_options;
  if (options_.command.empty()) {
    supervisor_options.argv = {self_path_, "__worker"};
  } else {
    supervisor_options.argv = options_.command;
  }
  supervisor_options.workers = options_.workers;
  supervisor_options.mode = dispatch_mode_ ? WorkerMode::dispatch : WorkerMode::inherit;
  supervisor_options.listeners = std::move(inherited);
  supervisor_options.reuse_port_per_worker = options_.reuseport;
  supervisor_.emplace(*dispatcher_, std::move(supervisor_options));
  supervisor_->on_event = [this](const SupervisorEvent& event) { on_supervisor_event(event); };
  dispatcher_->watch(signals_.borrow(), EPOLLIN, [this](std::uint32_t) { on_signal(); });

  supervisor_->start();
  if (!dispatch_mode_ && options_.reuseport) {
    const std::vector<Endpoint> endpoints = supervisor_->listener_endpoints();
    for (std::size_t i = 0; i < endpoints.size() && i < bound_.size(); ++i)
      bound_[i] = endpoints[i];
  }
  for (std::size_t i = 0; i < specs_.size(); ++i) {
    log::info("listening", "name={} endpoint={} mode={}{}", specs_[i].name,
              log::value(bound_[i].to_string()), options_.mode,
              options_.reuseport ? " reuseport=per-worker" : "");
  }
  log::info("control", "endpoint={}", log::value(control_->endpoint().to_string()));
  log::info("started", "pid={} workers={} mode={} policy={} worker={}", ::getpid(),
            options_.workers, options_.mode, dispatch_mode_ ? options_.policy : "kernel",
            log::value(options_.command.empty() ? std::string("built-in") : options_.command[0]));

  while (!supervisor_->finished()) {
    supervisor_->run_once(200ms);
    check_ready();
  }
  const dispatch::Stats stats = dispatcher_->stats();
  dispatcher_->unwatch(signals_.borrow());
  control_.reset();
  log::info("stopped", "accepted={} acknowledged={} dropped={}", stats.accepted, stats.acknowledged,
            stats.dropped);
  return 0;
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
                         ? "policy " + options_.policy
                         : std::string(options_.reuseport ? "one SO_REUSEPORT listener per worker"
                                                          : "one shared listener"));
  for (std::size_t i = 0; i < specs_.size(); ++i) {
    out += fmt::format("listener {:<10} {}\n", specs_[i].name, bound_[i].to_string());
  }
  std::vector<dispatch::WorkerView> views;
  if (dispatch_mode_) views = dispatcher_->workers();
  for (const WorkerStatus& w : supervisor_->status()) {
    std::string line = fmt::format("worker {:<3} pid {:<8} {:<10} starts {} exits {}", w.index,
                                   w.pid, w.running ? "running" : "restarting", w.starts, w.exits);
    if (w.last_exit_status >= 0) line += fmt::format(" last-exit {}", w.last_exit_status);
    if (w.crash_looping) line += " CRASH-LOOP";
    for (const auto& v : views) {
      if (v.id == w.worker_id && w.worker_id != 0) {
        line += fmt::format(" in-flight {} load {}", v.in_flight, v.reported_load);
      }
    }
    out += line + "\n";
  }
  if (dispatch_mode_) {
    const dispatch::Stats s = dispatcher_->stats();
    out += fmt::format(
        "connections  accepted {}  dispatched {}  acknowledged {}  redispatched {}  dropped {}\n",
        s.accepted, s.dispatched, s.acknowledged, s.redispatched, s.dropped);
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
  const std::vector<WorkerStatus> workers = supervisor_->status();
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
  Serve serve(options, self_path);  // UsageError propagates: exit status 2
  try {
    return serve.run();
  } catch (const std::exception& e) {
    log::error("failed", "error={}", log::value(e.what()));
    return 1;
  }
}

}  // namespace sockshare::cli
