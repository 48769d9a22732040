// The systemd conventions every Linux service manager speaks, in both directions:
// receiving listeners by socket activation (LISTEN_FDS), passing them to a child the same
// way, and reporting state back (sd_notify over NOTIFY_SOCKET, including the fd store).
// libc only: no libsystemd. docs/HANDOFF.md describes how these fit generation handoff.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sockshare/fd.hpp"
#include "sockshare/socket.hpp"

namespace sockshare::systemd {

// The first inherited descriptor (SD_LISTEN_FDS_START).
inline constexpr int kListenFdsStart = 3;
// systemd's limit for a descriptor name (FDNAME_MAX).
inline constexpr std::size_t kMaxNameLength = 255;

// ---------------------------------------------------------------------------------------
// Receiving: socket activation.

enum class ListenStatus {
  not_activated,  // LISTEN_FDS is not set: started by hand, nothing inherited
  activated,      // the descriptors are ours and were taken
  pid_mismatch,   // LISTEN_PID names another process: the descriptors are not for us
  invalid,        // a variable is malformed or inconsistent; nothing was taken
};

[[nodiscard]] std::string_view to_string(ListenStatus status) noexcept;

struct InheritedSocket {
  Fd fd;                    // close-on-exec
  std::string name;         // from LISTEN_FDNAMES, "unknown" when that is unset (as systemd)
  SocketIdentity identity;  // what the descriptor is (it may not even be a socket)
};

struct ListenFds {
  ListenStatus status = ListenStatus::not_activated;
  // Why the status is pid_mismatch or invalid, naming the variables and their values, for
  // the caller's log. sd_listen_fds() stays silent in these cases, which turns a
  // misconfigured unit into a server that listens on nothing without saying why.
  std::string diagnostic;
  std::vector<InheritedSocket> sockets;  // in descriptor order: 3, 4, ...

  // The first socket with this name, or nullptr.
  [[nodiscard]] InheritedSocket* find(std::string_view name) noexcept;
};

struct ListenFdsOptions {
  // Remove LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES from the environment whatever the
  // outcome, so no child started later believes the descriptors are meant for it.
  bool unset_environment = true;
};

// Like sd_listen_fds_with_names(): reads LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, and when
// they are valid and name this process, marks descriptors 3..3+n-1 close-on-exec and takes
// ownership of them with their names and identify() information. Never throws for the
// content of the variables: that is what `status` and `diagnostic` report. In the invalid
// case the descriptors, if LISTEN_PID named us, are marked close-on-exec but left open and
// unowned, because which of them are really ours is unknown. Not thread-safe (it reads and
// changes the environment): call it early in main().
[[nodiscard]] ListenFds listen_fds_from_environment(const ListenFdsOptions& options = {});

// The pure part of the above, for tests and fuzzing: validates the three values (nullopt =
// unset) against `self`. Checks syntax and consistency only, not whether descriptors are
// open.
struct ParsedListenEnvironment {
  ListenStatus status = ListenStatus::not_activated;
  std::string diagnostic;
  std::size_t count = 0;            // LISTEN_FDS, when it parsed
  bool addressed_to_us = false;     // LISTEN_PID parsed and equals `self`
  std::vector<std::string> names;  // `count` entries when status == activated
};
[[nodiscard]] ParsedListenEnvironment parse_listen_environment(
    std::optional<std::string_view> listen_fds, std::optional<std::string_view> listen_pid,
    std::optional<std::string_view> listen_fdnames, pid_t self);

// Splits LISTEN_FDNAMES into exactly `expected` names, each valid by is_valid_name().
// nullopt with `error` set when the value does not fit.
[[nodiscard]] std::optional<std::vector<std::string>> parse_fd_names(std::string_view value,
                                                                     std::size_t expected,
                                                                     std::string& error);

// systemd's rule for a descriptor name: 1-255 printable ASCII characters, no ':'.
[[nodiscard]] bool is_valid_name(std::string_view name) noexcept;

// ---------------------------------------------------------------------------------------
// Passing: starting a child by the same convention.

struct PassedListener {
  BorrowedFd fd;
  std::string name;  // must satisfy is_valid_name()
};

// Everything a child needs to find its listeners at 3, 4, ... with LISTEN_FDS,
// LISTEN_FDNAMES and LISTEN_PID set to its own pid, prepared before fork() so that the child
// runs only async-signal-safe code between fork() and exec(): apply_in_child() writes the
// pid digits into a buffer allocated here and moves descriptors with fcntl/dup2.
//
// Descriptors listed in `extra` land right after the listeners (3+n, 3+n+1, ...) without
// being counted in LISTEN_FDS, e.g. a readiness pipe or a channel to the parent.
class ActivationLayout {
public:
  // `base_environment`: NAME=value entries the child gets; LISTEN_* and NOTIFY_SOCKET
  // entries in it are dropped unless `keep_notify_socket`. Throws invalid_input for a bad
  // name or more descriptors than a process can hold.
  ActivationLayout(std::span<const PassedListener> listeners,
                   std::vector<std::string> base_environment,
                   std::span<const BorrowedFd> extra = {}, bool keep_notify_socket = false);
  ActivationLayout(const ActivationLayout&) = delete;
  ActivationLayout& operator=(const ActivationLayout&) = delete;

  // The environment for execve(); valid while this object lives. LISTEN_PID is complete
  // only after apply_in_child() ran in the child.
  [[nodiscard]] char* const* envp() noexcept { return envp_.data(); }
  [[nodiscard]] std::size_t listener_count() const noexcept { return listener_count_; }
  // Listeners plus extras: the child's descriptors 3 .. 3+descriptor_count()-1.
  [[nodiscard]] std::size_t descriptor_count() const noexcept { return sources_.size(); }

  // In the child, after fork() and before execve(): async-signal-safe, allocation-free.
  // Places the descriptors, clears close-on-exec on exactly those, marks every other
  // descriptor >= 3 close-on-exec (close_range(CLOSE_RANGE_CLOEXEC)) so nothing else leaks
  // through exec, and writes getpid() into LISTEN_PID. Returns 0 or an errno value.
  // Not const: it writes the pid into the prepared environment.
  [[nodiscard]] int apply_in_child() noexcept;

  // The current process's environment (environ) as NAME=value strings.
  [[nodiscard]] static std::vector<std::string> current_environment();

private:
  std::vector<std::string> env_;
  std::vector<char*> envp_;
  std::vector<int> sources_;  // listeners then extras; rewritten in the child
  std::size_t listener_count_ = 0;
  char* pid_digits_ = nullptr;  // inside env_: room for the digits of any pid
};

// fork()+execve() of `argv[0]` (a path, no PATH search) with `layout`. The pidfd is taken
// before anyone can reap the child, so it names exactly that process. The caller reaps it.
struct ActivatedChild {
  pid_t pid = -1;
  Fd pidfd;
};
[[nodiscard]] ActivatedChild spawn_activated(const std::vector<std::string>& argv,
                                             ActivationLayout& layout);

// ---------------------------------------------------------------------------------------
// Reporting: sd_notify.

// Sends one sd_notify datagram (`state` holds newline-separated VAR=value assignments) to
// NOTIFY_SOCKET, a path ("/run/...") or an abstract name ("@..."), with `fds` attached by
// SCM_RIGHTS when given (at most 253). Returns false, doing nothing, when NOTIFY_SOCKET is
// unset. Throws invalid_input for an unusable NOTIFY_SOCKET or state, and the send's error
// otherwise (refused when the manager's socket is gone, overloaded for ENOBUFS/ETOOMANYREFS).
// Never raises SIGPIPE.
bool notify(std::string_view state, std::span<const BorrowedFd> fds = {});

bool notify_ready(std::string_view status = {});     // READY=1 [+ STATUS=]
bool notify_reloading();                              // RELOADING=1 + MONOTONIC_USEC=
bool notify_stopping(std::string_view status = {});  // STOPPING=1 [+ STATUS=]
bool notify_status(std::string_view status);         // STATUS=
bool notify_main_pid(pid_t pid);                      // MAINPID=
// FDSTORE=1 + FDNAME=name: the service manager keeps copies of `fds` for the next start
// of this service (needs FileDescriptorStoreMax= in the unit). Keep in mind that systemd
// drops the store when the unit is stopped or its manager restarts (systemd #4408, #10243).
bool store_fds(std::span<const BorrowedFd> fds, std::string_view name);

}  // namespace sockshare::systemd
