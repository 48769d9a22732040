// The OS seam: every syscall whose failure modes matter goes through here, so EINTR is
// retried in exactly one place and tests can inject EAGAIN, EMFILE or ETOOMANYREFS.
#pragma once

#include <poll.h>

#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>

#include <cerrno>
#include <chrono>
#include <span>
#include <optional>
#include <string>

#include "sockshare/error.hpp"
#include "sockshare/fd.hpp"

// Constants newer than Debian 12's kernel headers; the values are the kernel's ABI.
#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif
#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83
#endif
#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
// pidfs (Linux 6.9+): a pidfd's inode identifies one process for the life of the boot.
#ifndef PID_FS_MAGIC
#define PID_FS_MAGIC 0x50494446
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

namespace sockshare::sys {

// Injectable entry points. Tests replace a member and restore it with SeamGuard.
struct Seam {
  ssize_t (*sendmsg)(int, const msghdr*, int) = ::sendmsg;
  ssize_t (*recvmsg)(int, msghdr*, int) = ::recvmsg;
  int (*accept4)(int, sockaddr*, socklen_t*, int) = ::accept4;
};
Seam& seam() noexcept;

class SeamGuard {
public:
  SeamGuard() : saved_(seam()) {}
  SeamGuard(const SeamGuard&) = delete;
  SeamGuard& operator=(const SeamGuard&) = delete;
  ~SeamGuard() { seam() = saved_; }

private:
  Seam saved_;
};

// Runs `call` until it does not fail with EINTR: the one retry loop for calls that return at
// once. Waits with a deadline go through wait_ready() or wait_any(), which recompute what is
// left.
template <class Call>
auto retry_eintr(Call&& call) {
  for (;;) {
    auto result = call();
    if (result >= 0 || errno != EINTR) return result;
  }
}

// Outcome of a non-blocking call: a value, "would block", or an error (thrown).
using Deadline = std::chrono::steady_clock::time_point;
inline constexpr Deadline kNoDeadline = Deadline::max();
Deadline deadline_after(std::chrono::milliseconds timeout);

// Waits until `fd` is ready for `events` (POLLIN/POLLOUT) or the deadline passes.
// Returns false on timeout. POLLHUP/POLLERR count as ready so the caller's next call
// reports the real error.
bool wait_ready(int fd, short events, Deadline deadline);
// The same for several descriptors: returns how many have revents set, 0 at the deadline.
int wait_any(std::span<pollfd> fds, Deadline deadline);

[[noreturn]] void throw_errno(std::string operation);

}  // namespace sockshare::sys

// Throws the current errno as an Error for `operation`, saving errno before the operation's
// text is built: an allocation may change errno even when it succeeds.
#define SOCKSHARE_THROW_ERRNO(operation)                             \
  do {                                                               \
    const int sockshare_saved_errno = errno;                         \
    ::sockshare::sys::throw_errno((operation), sockshare_saved_errno); \
  } while (false)

namespace sockshare::sys {
[[noreturn]] void throw_errno(std::string operation, int err);

// bind() of a unix socket whose file gets exactly `mode`. The umask is process-wide, so the
// library's binds that change it take one lock; a thread creating files meanwhile outside
// the library still sees the narrowed umask for the duration of the bind.
int bind_unix_with_mode(int fd, const sockaddr* addr, socklen_t length, unsigned mode);

// After bind() failed with EADDRINUSE on `path`: if no process answers on the socket file
// there (ECONNREFUSED), removes it and binds again; returns 0 on success or the errno to
// report. A live server, even one with a full backlog, keeps its file. Holds an flock on the
// directory so two servers starting together cannot remove each other's fresh socket.
// With `mode`, the new file is bound with exactly that mode (bind_unix_with_mode).
int replace_stale_unix_socket(int fd, const std::string& path, const sockaddr* addr,
                              socklen_t length, std::optional<unsigned> mode = std::nullopt);

// getsockopt of an int-sized option; nullopt when the option is unsupported.
std::optional<int> get_int_option(int fd, int level, int name);

}  // namespace sockshare::sys
