#include "linux/sys.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mutex>
#include <string>

namespace sockshare {

void Fd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Fd Fd::duplicate() const {
  int copy = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) SOCKSHARE_THROW_ERRNO("fcntl(fd " + std::to_string(fd_) + ", F_DUPFD_CLOEXEC)");
  return Fd(copy);
}

namespace sys {

Seam& seam() noexcept {
  static Seam instance;
  return instance;
}

Deadline deadline_after(std::chrono::milliseconds timeout) {
  if (timeout.count() < 0) return kNoDeadline;
  return std::chrono::steady_clock::now() + timeout;
}

bool wait_ready(int fd, short events, Deadline deadline) {
  pollfd p{fd, events, 0};
  return wait_any(std::span<pollfd>(&p, 1), deadline) > 0;
}

int wait_any(std::span<pollfd> fds, Deadline deadline) {
  for (;;) {
    int timeout_ms = -1;
    if (deadline != kNoDeadline) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return 0;
      timeout_ms = left.count() > 1'000'000 ? 1'000'000 : static_cast<int>(left.count());
    }
    const int n = ::poll(fds.data(), static_cast<nfds_t>(fds.size()), timeout_ms);
    if (n > 0) return n;
    if (n < 0 && errno != EINTR) {
      SOCKSHARE_THROW_ERRNO("poll(" + std::to_string(fds.size()) + " fds, first " +
                            std::to_string(fds.empty() ? -1 : fds[0].fd) + ")");
    }
  }
}

void throw_errno(std::string operation) { throw_errno(std::move(operation), errno); }

void throw_errno(std::string operation, int err) {
  throw Error::from_errno(std::move(operation), err);
}

int bind_unix_with_mode(int fd, const sockaddr* addr, socklen_t length, unsigned mode) {
  static std::mutex umask_mutex;
  std::lock_guard lock(umask_mutex);
  const mode_t old_mask = ::umask(static_cast<mode_t>(~mode & 0777));
  const int rc = ::bind(fd, addr, length);
  const int err = errno;
  ::umask(old_mask);
  return rc == 0 ? 0 : err;
}

int replace_stale_unix_socket(int fd, const std::string& path, const sockaddr* addr,
                              socklen_t length, std::optional<unsigned> mode) {
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd.valid()) return errno;
  if (retry_eintr([&] { return ::flock(dir_fd.get(), LOCK_EX); }) != 0) return errno;
  // Non-blocking: a live server with a full backlog answers EAGAIN instead of hanging us.
  Fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!probe.valid()) return errno;
  if (::connect(probe.get(), addr, length) == 0) return EADDRINUSE;
  if (errno != ECONNREFUSED) return EADDRINUSE;
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return errno;
  if (mode) return bind_unix_with_mode(fd, addr, length, *mode);
  return ::bind(fd, addr, length) == 0 ? 0 : errno;
}

std::optional<int> get_int_option(int fd, int level, int name) {
  int value = 0;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, level, name, &value, &len) != 0) return std::nullopt;
  return value;
}

}  // namespace sys
}  // namespace sockshare
