#include "linux/pidfd.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "linux/sys.hpp"

namespace sockshare::pidfd {
namespace {

// PIDFD_GET_INFO (Linux 6.13+). The kernel accepts any size from its first published
// layout (64 bytes) on and fills what both sides know.
struct PidfdInfo {
  std::uint64_t mask;
  std::uint64_t cgroupid;
  std::uint32_t pid;
  std::uint32_t tgid;
  std::uint32_t ppid;
  std::uint32_t ruid;
  std::uint32_t rgid;
  std::uint32_t euid;
  std::uint32_t egid;
  std::uint32_t suid;
  std::uint32_t sgid;
  std::uint32_t fsuid;
  std::uint32_t fsgid;
  std::uint32_t spare0;
};
static_assert(sizeof(PidfdInfo) == 64);
constexpr std::uint64_t kInfoPid = 1U << 0;
constexpr std::uint64_t kInfoCreds = 1U << 1;
constexpr unsigned long kGetInfo = _IOWR(0xFF, 11, PidfdInfo);

std::string op(const char* call, int fd) {
  return std::string(call) + "(pidfd " + std::to_string(fd) + ")";
}

// Before 6.13: the pid from /proc/self/fdinfo ("Pid: -1" once the process is gone) and the
// owner of /proc/<pid>, which is the process's effective uid.
Identity identify_from_proc(int fd) {
  Identity id;
  const std::string path = "/proc/self/fdinfo/" + std::to_string(fd);
  std::FILE* file = std::fopen(path.c_str(), "re");
  if (file == nullptr) {
    const int err = errno;
    sys::throw_errno("fopen(" + path + ")", err);
  }
  char line[256];
  long pid = 0;
  bool found = false;
  while (std::fgets(line, sizeof line, file) != nullptr) {
    if (std::sscanf(line, "Pid: %ld", &pid) == 1) {
      found = true;
      break;
    }
  }
  (void)std::fclose(file);
  if (!found) {
    throw Error(ErrorKind::invalid_input, 0, op("identify", fd), "not a pidfd");
  }
  if (pid <= 0)
    throw Error(ErrorKind::refused, ESRCH, op("identify", fd), "the process has exited");
  id.pid = static_cast<pid_t>(pid);
  struct stat st {};
  const std::string proc = "/proc/" + std::to_string(pid);
  if (::stat(proc.c_str(), &st) != 0) {
    const int err = errno;
    sys::throw_errno("stat(" + proc + ")", err);
  }
  id.uid = st.st_uid;
  return id;
}

}  // namespace

Fd open(pid_t pid) {
  auto fd = try_open(pid);
  if (!fd) {
    throw Error(ErrorKind::refused, ESRCH, "pidfd_open(" + std::to_string(pid) + ")",
                "no such process");
  }
  return std::move(*fd);
}

std::optional<Fd> try_open(pid_t pid) {
  if (pid <= 0) return std::nullopt;
  // pidfd_open sets O_CLOEXEC on the pidfd unconditionally.
  const long fd = ::syscall(SYS_pidfd_open, pid, 0);
  if (fd < 0) {
    if (errno == ESRCH) return std::nullopt;
    const int err = errno;
    sys::throw_errno("pidfd_open(" + std::to_string(pid) + ")", err);
  }
  return Fd(static_cast<int>(fd));
}

Identity identify(BorrowedFd pidfd) {
  const int fd = pidfd.get();
  Identity id;
  PidfdInfo info{};
  info.mask = kInfoPid | kInfoCreds;
  if (::ioctl(fd, kGetInfo, &info) == 0) {
    id.pid = static_cast<pid_t>(info.tgid != 0 ? info.tgid : info.pid);
    id.uid = info.euid;
  } else if (errno == ESRCH) {
    throw Error(ErrorKind::refused, ESRCH, op("PIDFD_GET_INFO", fd), "the process has exited");
  } else if (errno == ENOTTY || errno == EINVAL || errno == EOPNOTSUPP) {
    id = identify_from_proc(fd);
  } else {
    const int err = errno;
    sys::throw_errno(op("PIDFD_GET_INFO", fd), err);
  }
  struct statfs fs {};
  if (::fstatfs(fd, &fs) == 0 && static_cast<unsigned long>(fs.f_type) == PID_FS_MAGIC) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      sys::throw_errno(op("fstat", fd), err);
    }
    id.inode = st.st_ino;
  }
  return id;
}

Identity self() {
  static std::mutex mutex;
  static Identity cached;
  // Keyed by pid: a forked child must not inherit its parent's answer.
  std::lock_guard lock(mutex);
  if (cached.pid != ::getpid()) {
    Fd fd = open(::getpid());
    cached = identify(fd.borrow());
  }
  return cached;
}

bool exited(BorrowedFd pidfd) {
  pollfd p{pidfd.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

GetFdResult get_fd(BorrowedFd pidfd, int number) {
  GetFdResult result;
  const long fd = ::syscall(SYS_pidfd_getfd, pidfd.get(), number, 0);
  if (fd < 0) {
    result.error = errno;
  } else {
    result.fd = Fd(static_cast<int>(fd));
  }
  return result;
}

}  // namespace sockshare::pidfd
