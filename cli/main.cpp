// The sockshare command. Exit status follows the GNU/BSD tool convention: 0 success (and a
// clean shutdown of `serve`), 1 runtime failure, 2 usage error (docs/SERVE.md).
#include <limits.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "control.hpp"
#include "log.hpp"
#include "serve.hpp"
#include "sockshare/error.hpp"
#include "worker.hpp"

#ifndef SOCKSHARE_VERSION
#define SOCKSHARE_VERSION "0.1.0"
#endif

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

std::string self_path() {
  char path[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0) return "/proc/self/exe";
  return std::string(path, static_cast<std::size_t>(n));
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sockshare::cli;

  // The built-in worker is re-executed by serve; it is not part of the public interface, so
  // it is dispatched before CLI11 sees (and documents) it.
  if (argc == 2 && std::string_view(argv[1]) == "__worker") return run_builtin_worker();

  CLI::App app{
      "sockshare: share sockets between processes; run a dispatcher with worker processes."};
  app.set_version_flag("-V,--version", "sockshare " SOCKSHARE_VERSION);
  app.require_subcommand(1);
  app.footer("Exit status: 0 success, 1 runtime failure, 2 usage error. See docs/SERVE.md.");

  ServeOptions serve;
  CLI::App* serve_cmd = app.add_subcommand(
      "serve",
      "Accept on the listeners and serve with N worker processes (built-in HTTP worker, "
      "or COMMAND after --).");
  serve_cmd
      ->add_option("-l,--listen", serve.listen,
                   "[NAME=]ENDPOINT to listen on: 127.0.0.1:8080, [::1]:8081, unix:/path, "
                   "unix:@name; port 0 picks a free port (repeatable); optional when "
                   "the listeners come by socket activation (LISTEN_FDS)")
      ->type_name("ENDPOINT");
  serve_cmd->add_option("-w,--workers", serve.workers, "Worker processes")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  serve_cmd
      ->add_option("-p,--policy", serve.policy,
                   "Dispatch policy: least (least loaded, the default), rr (round-robin), "
                   "hash (client address, sticky)")
      ->check(CLI::IsMember({"rr", "least", "hash"}));
  serve_cmd
      ->add_option("-m,--mode", serve.mode,
                   "dispatch: serve accepts and hands each connection to a worker over a "
                   "channel; inherit: workers get the listeners (LISTEN_FDS) and accept")
      ->capture_default_str()
      ->check(CLI::IsMember({"dispatch", "inherit"}));
  serve_cmd->add_flag("--reuseport", serve.reuseport,
                      "inherit mode: one SO_REUSEPORT listener per worker instead of one shared "
                      "listener");
  serve_cmd
      ->add_option("-c,--control", serve.control,
                   "Control socket for `sockshare status`: unix:/path or unix:@name "
                   "(default: $XDG_RUNTIME_DIR/sockshare/serve-PID.sock or "
                   "/tmp/sockshare-UID/serve-PID.sock)")
      ->type_name("ENDPOINT");
  serve_cmd
      ->add_option("--drain-timeout", serve.drain_timeout_s,
                   "Seconds to finish connections in service after SIGTERM/SIGINT before "
                   "workers are killed")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  serve_cmd
      ->add_option("--max-in-flight", serve.max_in_flight,
                   "dispatch mode: unacknowledged connections per worker")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  serve_cmd
      ->add_option("--max-attempts", serve.max_attempts,
                   "dispatch mode: workers a connection may be lost with (each died reading "
                   "it before its ack) before it is closed instead of passed on; 0: no limit; "
                   "default 3")
      ->check(CLI::Range(0, 1000));
  serve_cmd
      ->add_option("--peek-bytes", serve.peek_bytes,
                   "dispatch mode: read up to N first bytes before the handoff and pass "
                   "them along with the connection")
      ->capture_default_str()
      ->check(CLI::Range(0, 16384));
  serve_cmd
      ->add_option("--defer-accept", serve.defer_accept_s,
                   "TCP listeners: queue a connection for accept only once its first bytes "
                   "arrived, or after SECONDS without any (TCP_DEFER_ACCEPT, systemd's "
                   "DeferAcceptSec=); 0: off. Default: 1 with the built-in worker, 0 with a "
                   "COMMAND (a protocol where the server speaks first must keep it off)")
      ->type_name("SECONDS")
      ->check(CLI::Range(0, 3600));
  serve_cmd
      ->add_option("--ready-fd", serve.ready_fd,
                   "Write 'listening NAME ENDPOINT', 'control ENDPOINT' and 'ready' lines "
                   "to this descriptor once every worker is up, then one line per reload")
      ->type_name("FD")
      ->check(CLI::Range(0, 1 << 20));
  serve_cmd
      ->add_option("--upgrade-from", serve.upgrade_from,
                   "Take the listeners over from a running serve (its pid or control "
                   "endpoint), start the workers, then tell it to drain and exit")
      ->type_name("PID|ENDPOINT");
  serve_cmd
      ->add_option("--ready-timeout", serve.ready_timeout_s,
                   "Seconds a reload's new generation gets to become ready before the reload "
                   "fails and the old generation keeps serving")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 3600.0));
  serve_cmd
      ->add_option("command", serve.command,
                   "Worker program and arguments, after --; default: the built-in HTTP "
                   "worker")
      ->type_name("COMMAND ARGS...");

  std::string status_control;
  pid_t status_pid = 0;
  bool status_prometheus = false;
  double status_timeout = 5;
  CLI::App* status_cmd = app.add_subcommand(
      "status", "Print the counters and latency histogram of a running `sockshare serve`.");
  auto* control_option =
      status_cmd->add_option("-c,--control", status_control, "Control socket of the serve process")
          ->type_name("ENDPOINT");
  status_cmd
      ->add_option("--pid", status_pid, "PID of a serve process using the default control socket")
      ->excludes(control_option)
      ->check(CLI::PositiveNumber);
  status_cmd->add_flag("--prometheus", status_prometheus, "Prometheus text exposition format");
  status_cmd->add_option("--timeout", status_timeout, "Seconds to wait for the answer")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 600.0));

  std::string reload_control;
  pid_t reload_pid = 0;
  double reload_timeout = 60;
  CLI::App* reload_cmd = app.add_subcommand(
      "reload",
      "Start a new generation of workers of a running `sockshare serve` (like SIGHUP) and wait "
      "until it serves; exit 1 if it failed and the old generation still serves.");
  auto* reload_control_option =
      reload_cmd->add_option("-c,--control", reload_control, "Control socket of the serve process")
          ->type_name("ENDPOINT");
  reload_cmd
      ->add_option("--pid", reload_pid, "PID of a serve process using the default control socket")
      ->excludes(reload_control_option)
      ->check(CLI::PositiveNumber);
  reload_cmd->add_option("--timeout", reload_timeout, "Seconds to wait for the outcome")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }

  if (serve_cmd->parsed()) {
    try {
      return run_serve(serve, self_path());
    } catch (const UsageError& e) {
      std::fprintf(stderr, "sockshare serve: %s\nRun with --help for more information.\n",
                   e.what());
      return kExitUsage;
    } catch (const std::exception& e) {
      log::error("failed", "error={}", log::value(e.what()));
      return kExitFailure;
    }
  }

  if (reload_cmd->parsed()) {
    sockshare::Endpoint endpoint;
    try {
      if (!reload_control.empty()) {
        endpoint = sockshare::parse_endpoint(reload_control);
      } else if (reload_pid > 0) {
        endpoint = control::default_endpoint(reload_pid, false);
      } else {
        std::fprintf(stderr,
                     "sockshare reload: --control ENDPOINT or --pid PID is required\n"
                     "Run with --help for more information.\n");
        return kExitUsage;
      }
    } catch (const sockshare::Error& e) {
      std::fprintf(stderr, "sockshare reload: --control %s: %s\n", reload_control.c_str(),
                   e.what());
      return kExitUsage;
    }
    try {
      const auto timeout = std::chrono::milliseconds(static_cast<long long>(reload_timeout * 1000));
      const std::string outcome = control::request_reload(endpoint, timeout);
      std::printf("%s\n", outcome.c_str());
      return std::fflush(stdout) == 0 ? 0 : kExitFailure;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "sockshare reload: %s: %s\n", endpoint.to_string().c_str(), e.what());
      return kExitFailure;
    }
  }

  if (status_cmd->parsed()) {
    sockshare::Endpoint endpoint;
    try {
      if (!status_control.empty()) {
        endpoint = sockshare::parse_endpoint(status_control);
      } else if (status_pid > 0) {
        endpoint = control::default_endpoint(status_pid, false);
      } else {
        std::fprintf(stderr,
                     "sockshare status: --control ENDPOINT or --pid PID is required\n"
                     "Run with --help for more information.\n");
        return kExitUsage;
      }
    } catch (const sockshare::Error& e) {
      std::fprintf(stderr, "sockshare status: --control %s: %s\n", status_control.c_str(),
                   e.what());
      return kExitUsage;
    }
    try {
      const auto timeout = std::chrono::milliseconds(static_cast<long long>(status_timeout * 1000));
      std::string report = control::request_status(endpoint, status_prometheus, timeout);
      std::fwrite(report.data(), 1, report.size(), stdout);
      return std::fflush(stdout) == 0 ? 0 : kExitFailure;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "sockshare status: %s: %s\n", endpoint.to_string().c_str(), e.what());
      return kExitFailure;
    }
  }
  return kExitUsage;
}
