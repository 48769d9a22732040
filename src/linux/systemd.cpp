// Socket activation (both directions) and sd_notify, without libsystemd.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <climits>
#include <cstring>
#include <string>

#include "linux/sys.hpp"
#include "sockshare/systemd.hpp"
#include "sockshare/wire.hpp"

extern char** environ;

namespace sockshare::systemd {
namespace {

constexpr std::string_view kListenFds = "LISTEN_FDS";
constexpr std::string_view kListenPid = "LISTEN_PID";
constexpr std::string_view kListenFdNames = "LISTEN_FDNAMES";
constexpr std::string_view kNotifySocket = "NOTIFY_SOCKET";
// Digits of the largest pid_t plus the terminating NUL.
constexpr std::size_t kPidRoom = 11;
// How long notify() waits for room in the manager's receive queue before giving up: the
// manager reads its notify socket continuously, so this only triggers when it is wedged,
// and a service must not hang with it.
constexpr std::chrono::milliseconds kNotifyTimeout{5000};

std::optional<std::string> env_value(std::string_view name) {
  const char* value = std::getenv(std::string(name).c_str());
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

bool has_name(std::string_view entry, std::string_view name) {
  return entry.size() > name.size() && entry.starts_with(name) && entry[name.size()] == '=';
}

}  // namespace

ListenFds listen_fds_from_environment(const ListenFdsOptions& options) {
  // Copies: unsetenv() below may free what getenv() pointed to.
  const auto fds_text = env_value(kListenFds);
  const auto pid_text = env_value(kListenPid);
  const auto names_text = env_value(kListenFdNames);
  if (options.unset_environment) {
    ::unsetenv(std::string(kListenFds).c_str());
    ::unsetenv(std::string(kListenPid).c_str());
    ::unsetenv(std::string(kListenFdNames).c_str());
  }

  ParsedListenEnvironment parsed = parse_listen_environment(
      fds_text ? std::optional<std::string_view>(*fds_text) : std::nullopt,
      pid_text ? std::optional<std::string_view>(*pid_text) : std::nullopt,
      names_text ? std::optional<std::string_view>(*names_text) : std::nullopt, ::getpid());
  ListenFds out;
  out.status = parsed.status;
  out.diagnostic = std::move(parsed.diagnostic);
  if (!parsed.addressed_to_us) return out;

  // First make every descriptor meant for us close-on-exec, valid or not, so none of them
  // reaches a child this process starts later; note the first that is not open at all.
  int missing = -1;
  for (std::size_t i = 0; i < parsed.count; ++i) {
    const int fd = kListenFdsStart + static_cast<int>(i);
    const int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) {
      if (missing < 0) missing = fd;
      continue;
    }
    if ((flags & FD_CLOEXEC) == 0 && ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0) {
      sys::throw_errno("fcntl(fd " + std::to_string(fd) + ", F_SETFD, FD_CLOEXEC)");
    }
  }
  if (out.status != ListenStatus::activated) return out;
  if (missing >= 0) {
    out.status = ListenStatus::invalid;
    out.diagnostic = "LISTEN_FDS=" + std::to_string(parsed.count) + " but descriptor " +
                     std::to_string(missing) + " is not open";
    return out;
  }
  out.sockets.reserve(parsed.count);
  for (std::size_t i = 0; i < parsed.count; ++i) {
    InheritedSocket socket;
    socket.fd = Fd(kListenFdsStart + static_cast<int>(i));
    socket.name = std::move(parsed.names[i]);
    out.sockets.push_back(std::move(socket));
  }
  // After every descriptor is owned, so a failing fstat cannot leave some of them unowned.
  for (auto& socket : out.sockets) socket.identity = identify(socket.fd.borrow());
  return out;
}

// ---------------------------------------------------------------------------------------

ActivationLayout::ActivationLayout(std::span<const PassedListener> listeners,
                                   std::vector<std::string> base_environment,
                                   std::span<const BorrowedFd> extra, bool keep_notify_socket)
    : listener_count_(listeners.size()) {
  std::string names;
  for (const auto& listener : listeners) {
    if (!listener.fd.valid()) {
      throw Error(ErrorKind::invalid_input, 0, "ActivationLayout", "invalid descriptor for " + listener.name);
    }
    if (!is_valid_name(listener.name)) {
      throw Error(ErrorKind::invalid_input, 0, "ActivationLayout",
                  "listener name \"" + listener.name +
                      "\" is not valid for LISTEN_FDNAMES (1-255 printable ASCII, no ':')");
    }
    if (!names.empty()) names += ':';
    names += listener.name;
    sources_.push_back(listener.fd.get());
  }
  for (auto fd : extra) {
    if (!fd.valid()) throw Error(ErrorKind::invalid_input, 0, "ActivationLayout", "invalid extra descriptor");
    sources_.push_back(fd.get());
  }
  if (sources_.size() > static_cast<std::size_t>(INT_MAX - kListenFdsStart) / 2) {
    throw Error(ErrorKind::invalid_input, 0, "ActivationLayout", "too many descriptors");
  }
  for (auto& entry : base_environment) {
    if (has_name(entry, kListenFds) || has_name(entry, kListenPid) ||
        has_name(entry, kListenFdNames)) {
      continue;
    }
    if (!keep_notify_socket && has_name(entry, kNotifySocket)) continue;
    env_.push_back(std::move(entry));
  }
  if (listener_count_ > 0) {
    env_.push_back(std::string(kListenFds) + "=" + std::to_string(listener_count_));
    env_.push_back(std::string(kListenFdNames) + "=" + names);
    // Filled in by the child: the pid does not exist before fork(), and nothing may be
    // allocated after it.
    env_.push_back(std::string(kListenPid) + "=" + std::string(kPidRoom, '\0'));
    pid_digits_ = env_.back().data() + kListenPid.size() + 1;
  }
  envp_.reserve(env_.size() + 1);
  for (auto& entry : env_) envp_.push_back(entry.data());
  envp_.push_back(nullptr);
}

int ActivationLayout::apply_in_child() noexcept {
  const int target_end = kListenFdsStart + static_cast<int>(sources_.size());
  // Out of the target range first, so no dup2 overwrites a source not yet placed. The
  // copies are close-on-exec and vanish at exec.
  for (int& fd : sources_) {
    fd = ::fcntl(fd, F_DUPFD_CLOEXEC, target_end);
    if (fd < 0) return errno;
  }
  // dup2 clears close-on-exec on the copy: exactly these become inheritable.
  for (std::size_t i = 0; i < sources_.size(); ++i) {
    if (::dup2(sources_[i], kListenFdsStart + static_cast<int>(i)) < 0) return errno;
  }
  // Anything above that someone opened without close-on-exec must not leak into the new
  // program. Marking instead of closing keeps the descriptors this code still needs.
  // Kernels before 5.11 lack the flag; there every sockshare descriptor is close-on-exec
  // already.
  ::close_range(static_cast<unsigned>(target_end), ~0U, CLOSE_RANGE_CLOEXEC);
  if (pid_digits_ != nullptr) {
    char reversed[kPidRoom];
    std::size_t n = 0;
    auto pid = static_cast<unsigned long>(::getpid());
    do {
      reversed[n++] = static_cast<char>('0' + pid % 10);
      pid /= 10;
    } while (pid != 0 && n < kPidRoom - 1);
    for (std::size_t i = 0; i < n; ++i) pid_digits_[i] = reversed[n - 1 - i];
    pid_digits_[n] = '\0';
  }
  return 0;
}

std::vector<std::string> ActivationLayout::current_environment() {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) out.emplace_back(*e);
  return out;
}

ActivatedChild spawn_activated(const std::vector<std::string>& argv, ActivationLayout& layout) {
  if (argv.empty()) throw Error(ErrorKind::invalid_input, 0, "spawn_activated", "empty argv");
  std::vector<std::string> args = argv;
  std::vector<char*> arg_pointers;
  for (auto& a : args) arg_pointers.push_back(a.data());
  arg_pointers.push_back(nullptr);
  const std::string op = "spawn_activated(" + argv[0] + ")";

  // The child reports a failed exec (or layout) through this pipe; a successful exec
  // closes it silently (close-on-exec), which the parent reads as EOF.
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) sys::throw_errno(op + ": pipe2");
  Fd report_read(report[0]);
  Fd report_write(report[1]);
  // Above the range the child's dup2 calls write to, so the report survives the layout.
  const int target_end = kListenFdsStart + static_cast<int>(layout.descriptor_count());
  if (report_write.get() < target_end) {
    Fd moved(::fcntl(report_write.get(), F_DUPFD_CLOEXEC, target_end));
    if (!moved.valid()) sys::throw_errno(op + ": fcntl(F_DUPFD_CLOEXEC)");
    report_write = std::move(moved);
  }
  const int write_end = report_write.get();

  const pid_t pid = ::fork();
  if (pid < 0) sys::throw_errno(op + ": fork");
  if (pid == 0) {
    // Async-signal-safe calls only from here on.
    sigset_t none;
    ::sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &dfl, nullptr);
    int err = layout.apply_in_child();
    if (err == 0) {
      ::execve(arg_pointers[0], arg_pointers.data(), layout.envp());
      err = errno;
    }
    [[maybe_unused]] ssize_t ignored = ::write(write_end, &err, sizeof err);
    ::_exit(127);
  }
  report_write.reset();

  ActivatedChild child;
  child.pid = pid;
  // Not reaped yet, so the pid cannot name another process: pidfd_open is race-free.
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd >= 0) child.pidfd = Fd(pidfd);

  int child_errno = 0;
  const ssize_t n =
      sys::retry_eintr([&] { return ::read(report_read.get(), &child_errno, sizeof child_errno); });
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    sys::retry_eintr([&] { return ::waitpid(pid, nullptr, 0); });
    sys::throw_errno(op, child_errno);
  }
  return child;
}

// ---------------------------------------------------------------------------------------

bool notify(std::string_view state, std::span<const BorrowedFd> fds) {
  const auto target = env_value(kNotifySocket);
  if (!target || target->empty()) return false;
  const std::string op = "sd_notify(NOTIFY_SOCKET=" + *target + ", " +
                         std::to_string(fds.size()) + " fds)";
  if (state.empty()) throw Error(ErrorKind::invalid_input, 0, op, "empty state");
  if (fds.size() > wire::kMaxFds) {
    throw Error(ErrorKind::invalid_input, 0, op, "more than 253 descriptors in one message (R8)");
  }
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  const bool abstract = (*target)[0] == '@';
  if (!abstract && (*target)[0] != '/') {
    // systemd also accepts "vsock:CID:PORT" for virtual machines; sockshare does not.
    throw Error(ErrorKind::invalid_input, 0, op,
                "NOTIFY_SOCKET must be an absolute path or an abstract name starting with '@'");
  }
  if (target->size() > sizeof(sun.sun_path) - (abstract ? 0 : 1)) {
    throw Error(ErrorKind::invalid_input, 0, op, "NOTIFY_SOCKET longer than a unix address");
  }
  std::memcpy(sun.sun_path, target->data(), target->size());
  if (abstract) sun.sun_path[0] = '\0';
  const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + target->size() +
                                             (abstract ? 0 : 1));

  Fd sock(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!sock.valid()) sys::throw_errno(op + ": socket(AF_UNIX, SOCK_DGRAM)");
  // Connected, so poll() reports when the manager's queue has room again: an unconnected
  // datagram socket is always "writable" and would leave only busy retries.
  if (sys::retry_eintr([&] {
        return ::connect(sock.get(), reinterpret_cast<const sockaddr*>(&sun), length);
      }) != 0) {
    sys::throw_errno(op + ": connect");
  }

  iovec iov{const_cast<char*>(state.data()), state.size()};
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * wire::kMaxFds)> control{};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    const std::size_t bytes = sizeof(int) * fds.size();
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(bytes);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(bytes);
    auto* out = reinterpret_cast<int*>(CMSG_DATA(cmsg));
    for (std::size_t i = 0; i < fds.size(); ++i) out[i] = fds[i].get();
  }
  const auto deadline = sys::deadline_after(kNotifyTimeout);
  for (;;) {
    const ssize_t n = sys::retry_eintr(
        [&] { return sys::seam().sendmsg(sock.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT); });
    if (n >= 0) return true;
    if (errno != EAGAIN && errno != EWOULDBLOCK) sys::throw_errno(op + ": sendmsg");
    if (!sys::wait_ready(sock.get(), POLLOUT, deadline)) {
      throw Error(ErrorKind::timed_out, 0, op, "the service manager is not reading its socket");
    }
  }
}

namespace {
std::string with_status(std::string state, std::string_view status) {
  if (!status.empty()) {
    // A newline would start a new assignment the caller did not mean to send.
    if (status.find('\n') != std::string_view::npos) {
      throw Error(ErrorKind::invalid_input, 0, "sd_notify STATUS=", "status text contains a newline");
    }
    state += "\nSTATUS=";
    state += status;
  }
  return state;
}
}  // namespace

bool notify_ready(std::string_view status) { return notify(with_status("READY=1", status)); }

bool notify_reloading() {
  // Type=notify-reload wants the CLOCK_MONOTONIC time of the reload with RELOADING=1.
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const auto usec = static_cast<unsigned long long>(now.tv_sec) * 1000000ULL +
                    static_cast<unsigned long long>(now.tv_nsec) / 1000ULL;
  return notify("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(usec));
}

bool notify_stopping(std::string_view status) { return notify(with_status("STOPPING=1", status)); }

bool notify_status(std::string_view status) {
  if (status.empty()) throw Error(ErrorKind::invalid_input, 0, "sd_notify STATUS=", "empty status");
  return notify(with_status("", status).substr(1));
}

bool notify_main_pid(pid_t pid) {
  if (pid <= 0) throw Error(ErrorKind::invalid_input, 0, "sd_notify MAINPID=", "not a process id");
  return notify("MAINPID=" + std::to_string(pid));
}

bool store_fds(std::span<const BorrowedFd> fds, std::string_view name) {
  if (!is_valid_name(name)) {
    throw Error(ErrorKind::invalid_input, 0, "sd_notify FDSTORE=1",
                "FDNAME \"" + std::string(name) + "\" is not valid (1-255 printable ASCII, no ':')");
  }
  if (fds.empty()) throw Error(ErrorKind::invalid_input, 0, "sd_notify FDSTORE=1", "no descriptors");
  return notify("FDSTORE=1\nFDNAME=" + std::string(name), fds);
}

}  // namespace sockshare::systemd
