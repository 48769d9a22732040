#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "linux/sys.hpp"
#include "sockshare/spawn.hpp"

extern char** environ;

namespace sockshare {
namespace {

// clone3's argument block, first published layout (CLONE_ARGS_SIZE_VER0 = 64 bytes).
struct CloneArgs {
  std::uint64_t flags;
  std::uint64_t pidfd;
  std::uint64_t child_tid;
  std::uint64_t parent_tid;
  std::uint64_t exit_signal;
  std::uint64_t stack;
  std::uint64_t stack_size;
  std::uint64_t tls;
};
static_assert(sizeof(CloneArgs) == 64);
constexpr std::uint64_t kClonePidfd = 0x1000;
// waitid's P_PIDFD (Linux 5.4), missing from older C library headers.
constexpr int kPidfdIdType = 3;

bool named(const char* entry, const std::string& name) {
  return std::strncmp(entry, name.c_str(), name.size()) == 0 && entry[name.size()] == '=';
}

}  // namespace

SpawnedChild spawn_with_socket(GrantServer& server, BorrowedFd socket, const ChildSpec& spec) {
  const std::string op =
      "spawn_with_socket(" + (spec.argv.empty() ? std::string("?") : spec.argv[0]) + ")";
  if (spec.argv.empty()) throw Error(ErrorKind::invalid_input, 0, op, "argv is empty");

  // The info travels over a socketpair rather than a pipe so that writing to a child that
  // died early is EPIPE (MSG_NOSIGNAL), not SIGPIPE.
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    const int err = errno;
    sys::throw_errno(op + ": socketpair", err);
  }
  Fd parent_end(pair[0]);
  Fd child_end(pair[1]);

  // Everything the child touches is built now: between clone and exec it only reads into
  // this memory, moves one descriptor and calls execve (async-signal-safe calls only).
  const std::string fd_name = spec.info_name + "_FD";
  std::vector<std::string> envs;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!named(*e, spec.info_name) && !named(*e, fd_name)) envs.emplace_back(*e);
  }
  for (const auto& extra : spec.env) envs.push_back(extra);
  std::vector<std::string> args = spec.argv;
  char* slot = nullptr;
  if (spec.passing == InfoPassing::argument) {
    args.emplace_back(SocketInfo::kTextSize, ' ');
  } else if (spec.passing == InfoPassing::environment) {
    envs.push_back(spec.info_name + "=" + std::string(SocketInfo::kTextSize, ' '));
  } else {
    // The child keeps the descriptor's own number, so no descriptor it inherits from
    // elsewhere is overwritten.
    envs.push_back(fd_name + "=" + std::to_string(child_end.get()));
  }
  std::vector<char*> argp;
  for (auto& a : args) argp.push_back(a.data());
  argp.push_back(nullptr);
  std::vector<char*> envp;
  for (auto& e : envs) envp.push_back(e.data());
  envp.push_back(nullptr);
  if (spec.passing == InfoPassing::argument) slot = args.back().data();
  if (spec.passing == InfoPassing::environment)
    slot = envs.back().data() + spec.info_name.size() + 1;
  const int info_fd = child_end.get();

  // Async-signal-safe calls only: the child may be a fork() of a multithreaded process.
  // `gated`: wait for one byte first, which the parent sends once it holds the pidfd.
  const int parent_fd = parent_end.get();
  auto run_child = [&](bool gated) {
    // Without the parent's end in here too, a parent that gives up (or dies) leaves the
    // reads below at end of file instead of waiting forever.
    ::close(parent_fd);
    if (gated) {
      char go = 0;
      if (sys::retry_eintr([&] { return ::read(info_fd, &go, 1); }) != 1) ::_exit(127);
    }
    if (slot != nullptr) {
      std::size_t got = 0;
      while (got < SocketInfo::kTextSize) {
        const ssize_t n = sys::retry_eintr(
            [&] { return ::read(info_fd, slot + got, SocketInfo::kTextSize - got); });
        if (n <= 0) ::_exit(127);  // the parent could not make the grant
        got += static_cast<std::size_t>(n);
      }
    } else if (::fcntl(info_fd, F_SETFD, 0) != 0) {  // the one descriptor exec must keep
      ::_exit(127);
    }
    ::execve(argp[0], argp.data(), envp.data());
    ::_exit(127);
  };

  int pidfd = -1;
  CloneArgs clone_args{};
  clone_args.flags = kClonePidfd;
  clone_args.pidfd = reinterpret_cast<std::uintptr_t>(&pidfd);
  clone_args.exit_signal = SIGCHLD;
  long pid = ::syscall(SYS_clone3, &clone_args, sizeof clone_args);
  if (pid == 0) run_child(false);
  // Container seccomp profiles (Docker's default among them) answer clone3 with ENOSYS or
  // EPERM, because its flags sit behind a pointer a filter cannot inspect.
  const bool forked = pid < 0 && (errno == ENOSYS || errno == EPERM);
  if (forked) {
    pid = ::fork();
    if (pid == 0) run_child(true);
  }
  if (pid < 0) {
    const int err = errno;
    sys::throw_errno(op + (forked ? ": fork" : ": clone3(CLONE_PIDFD)"), err);
  }

  SpawnedChild child;
  child.pid = static_cast<pid_t>(pid);
  child_end.reset();
  try {
    if (forked) {
      // The child is blocked on the gate, unreaped and cannot exit by itself, so its pid
      // still names it: pidfd_open is race-free. Only then may it go on to exec.
      const long opened = ::syscall(SYS_pidfd_open, child.pid, 0);
      if (opened < 0) {
        const int err = errno;
        sys::throw_errno(op + ": pidfd_open(child " + std::to_string(pid) + ")", err);
      }
      child.pidfd = Fd(static_cast<int>(opened));
      // Killed from outside before pidfd_open, with SIGCHLD ignored (auto-reap), the pid
      // could already name a stranger; waitid(P_PIDFD) answers ECHILD for anything not ours.
      siginfo_t state{};
      const auto by_pidfd = static_cast<idtype_t>(kPidfdIdType);
      const auto pidfd_id = static_cast<id_t>(child.pidfd.get());
      if (sys::retry_eintr([&] {
            return ::waitid(by_pidfd, pidfd_id, &state, WEXITED | WNOHANG | WNOWAIT);
          }) != 0) {
        const int err = errno;
        child.pidfd.reset();
        if (err == ECHILD) {
          throw Error(ErrorKind::peer_gone, ECHILD, op,
                      "child " + std::to_string(pid) + " vanished before it could be granted");
        }
        sys::throw_errno(op + ": waitid(P_PIDFD, child " + std::to_string(pid) + ")", err);
      }
      const char go = 'g';
      if (sys::retry_eintr([&] { return ::send(parent_end.get(), &go, 1, MSG_NOSIGNAL); }) != 1) {
        const int err = errno;
        sys::throw_errno(op + ": send(gate to child " + std::to_string(pid) + ")", err);
      }
    } else {
      child.pidfd = Fd(pidfd);
    }
    child.info = server.duplicate(socket, Target::pidfd(child.pidfd.borrow()), spec.grant);
    std::string text = child.info.format();
    if (spec.passing == InfoPassing::pipe) text += '\n';
    std::size_t sent = 0;
    while (sent < text.size()) {
      const ssize_t n = sys::retry_eintr([&] {
        return ::send(parent_end.get(), text.data() + sent, text.size() - sent, MSG_NOSIGNAL);
      });
      if (n < 0) {
        const int err = errno;
        sys::throw_errno(op + ": send(info to child " + std::to_string(pid) + ")", err);
      }
      sent += static_cast<std::size_t>(n);
    }
  } catch (...) {
    parent_end.reset();
    // clone3's child, or a forked one we hold a pidfd for, is certainly ours and unreaped,
    // so its pid cannot have been reused: kill and reap it. A forked child without a pidfd might not be (see waitid above); the closed
    // gate ends ours by itself, and waitpid can only reap our own children.
    if (child.pidfd.valid() || !forked) ::kill(child.pid, SIGKILL);
    sys::retry_eintr([&] { return ::waitpid(child.pid, nullptr, 0); });
    throw;
  }
  return child;
}

}  // namespace sockshare
