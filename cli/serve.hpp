// `sockshare serve`: listeners, a supervisor running N workers, a dispatcher (dispatch mode)
// or inherited listeners (inherit mode), a control socket, and signal handling.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace sockshare::cli {

// A command line that parses but does not make sense; main() turns it into exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ServeOptions {
  std::vector<std::string> listen;  // [name=]endpoint
  std::uint32_t workers = 2;
  std::string policy;             // rr | least | hash; empty: least (dispatch mode)
  std::string mode = "dispatch";  // dispatch | inherit
  bool reuseport = false;         // inherit mode: one SO_REUSEPORT listener per worker
  std::string control;            // endpoint; empty: control::default_endpoint
  double drain_timeout_s = 10;
  std::uint32_t max_in_flight = 128;
  std::optional<std::uint32_t> max_attempts;  // dispatch mode; 0: no limit; unset: the library's
  std::uint32_t peek_bytes = 0;
  // TCP_DEFER_ACCEPT seconds on the TCP listeners serve opens; -1: 1 with the built-in worker
  // (HTTP: the client speaks first), 0 (off) with a COMMAND, whose protocol is unknown.
  int defer_accept_s = -1;
  int ready_fd = -1;                 // readiness lines for a parent (docs/SERVE.md)
  double ready_timeout_s = 10;       // a reload's new generation must be ready within this
  std::string upgrade_from;  // control endpoint or pid of a running serve to take over from
  std::vector<std::string> command;  // empty: the built-in worker
};

// Runs until a graceful stop. Returns the exit status (0 clean, 1 runtime failure); throws
// UsageError for inconsistent options.
int run_serve(const ServeOptions& options, const std::string& self_path);

}  // namespace sockshare::cli
