#include "linux/sys.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <string>

namespace sockshare {

void Fd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Fd Fd::duplicate() const {
  int copy = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) sys::throw_errno("fcntl(fd " + std::to_string(fd_) + ", F_DUPFD_CLOEXEC)");
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
  for (;;) {
    int timeout_ms = -1;
    if (deadline != kNoDeadline) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      timeout_ms = left.count() > 1'000'000 ? 1'000'000 : static_cast<int>(left.count());
    }
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, timeout_ms);
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) throw_errno("poll(fd " + std::to_string(fd) + ")");
  }
}

void throw_errno(std::string operation) { throw_errno(std::move(operation), errno); }

void throw_errno(std::string operation, int err) {
  throw Error::from_errno(std::move(operation), err);
}

std::optional<int> get_int_option(int fd, int level, int name) {
  int value = 0;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, level, name, &value, &len) != 0) return std::nullopt;
  return value;
}

}  // namespace sys
}  // namespace sockshare
