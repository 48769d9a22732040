// The commonest grant: a parent hands a socket to a child it starts. The child is created
// with clone3(CLONE_PIDFD), so the grant is bound to the child's pidfd with no window in
// which the pid could name another process. Where seccomp refuses clone3 (ENOSYS or EPERM,
// as container runtimes do) it is fork() + pidfd_open instead, with the child held before
// exec until the parent has its pidfd. The info reaches the child in argv, the environment
// or a pipe.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "sockshare/fd.hpp"
#include "sockshare/grant.hpp"

namespace sockshare {

enum class InfoPassing : std::uint8_t {
  argument,     // appended as the last argument
  environment,  // as <info_name>=<text>
  pipe,         // <info_name>_FD=<n>: one line on descriptor n, which the child reads once
};

struct ChildSpec {
  std::vector<std::string> argv{};  // argv[0] is the program's path (no PATH search)
  std::vector<std::string> env{};   // NAME=value entries added to this process's environment
  InfoPassing passing = InfoPassing::environment;
  std::string info_name = "SOCKSHARE_INFO";
  GrantOptions grant{};
};

struct SpawnedChild {
  pid_t pid = -1;
  Fd pidfd;  // the caller reaps the child (waitpid or waitid(P_PIDFD))
  SocketInfo info;
};

// Starts the child and grants it `socket` (share mode: the grant holds its own copy until the
// child acknowledges, so the caller may close its descriptor as soon as this returns, which
// makes it a move). For argument and environment passing the child waits, before exec, until
// the grant exists; if granting fails the child is killed and reaped and the error thrown.
// The child redeems with redeem(inherited_info()) or redeem(SocketInfo::parse(argv.back())).
[[nodiscard]] SpawnedChild spawn_with_socket(GrantServer& server, BorrowedFd socket,
                                             const ChildSpec& spec);

}  // namespace sockshare
