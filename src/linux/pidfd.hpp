// Process identity through pidfds (R17): a pidfd names one process and cannot be fooled by
// PID reuse; on pidfs (Linux 6.9+) its inode is unique for the boot, so two pidfds name the
// same process exactly when their inodes are equal, even across processes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>

#include "sockshare/fd.hpp"

namespace sockshare::pidfd {

// What a pidfd says about its process. inode is 0 when the kernel has no pidfs (before
// 6.9, every pidfd shares one anonymous inode and identity falls back to pid + uid).
struct Identity {
  pid_t pid = 0;
  uid_t uid = 0;  // effective
  std::uint64_t inode = 0;
};

// pidfd_open(pid, 0): close-on-exec. Throws refused (ESRCH: no such process) or system.
[[nodiscard]] Fd open(pid_t pid);
// Like open(), but nullopt when the process does not exist.
[[nodiscard]] std::optional<Fd> try_open(pid_t pid);

// pid, effective uid and pidfs inode of the process behind `pidfd` (PIDFD_GET_INFO on
// 6.13+, /proc/self/fdinfo and /proc/<pid> before). Throws refused when the process has
// exited. Effective, not real: the identities compared against this one come from
// SO_PEERCRED where SO_PEERPIDFD is missing, which carries the peer's effective uid, and
// the /proc fallback can only see the effective uid (the owner of /proc/<pid>); mixing
// real and effective would refuse any process whose two uids differ.
[[nodiscard]] Identity identify(BorrowedFd pidfd);

// Our own identity, computed once per process.
[[nodiscard]] Identity self();

// True when the process behind `pidfd` has exited (the pidfd polls readable).
[[nodiscard]] bool exited(BorrowedFd pidfd);

// pidfd_getfd(pidfd, number, 0): a close-on-exec copy of descriptor `number` of that process.
// Returns the errno on failure (EPERM under ptrace rules, ENOSYS, EBADF) instead of throwing:
// callers fall back to SCM_RIGHTS.
struct GetFdResult {
  Fd fd;
  int error = 0;
};
[[nodiscard]] GetFdResult get_fd(BorrowedFd pidfd, int number);

}  // namespace sockshare::pidfd
