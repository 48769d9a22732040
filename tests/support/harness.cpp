#include "support/harness.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <map>
#include <stdexcept>

extern char** environ;

namespace sockshare::test {
namespace {

constexpr const char* kHelperFlag = "--sockshare-helper";
constexpr const char* kReadyEnv = "SOCKSHARE_TEST_READY_FD";

std::map<std::string, HelperFunction>& registry() {
  static std::map<std::string, HelperFunction> helpers;
  return helpers;
}

}  // namespace

HelperRegistration::HelperRegistration(const char* name, HelperFunction function) {
  registry()[name] = function;
}

void HelperContext::ready(std::string_view line) const {
  std::string text(line);
  text += '\n';
  const char* p = text.data();
  std::size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(ready_fd_, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) std::_Exit(121);
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

int run_helper_if_requested(int argc, char** argv) {
  if (argc < 3 || std::strcmp(argv[1], kHelperFlag) != 0) return -1;
  auto it = registry().find(argv[2]);
  if (it == registry().end()) {
    std::fprintf(stderr, "unknown helper %s\n", argv[2]);
    return 120;
  }
  int ready_fd = -1;
  if (const char* text = std::getenv(kReadyEnv)) ready_fd = std::atoi(text);
  ::unsetenv(kReadyEnv);
  HelperContext context(std::vector<std::string>(argv + 3, argv + argc), ready_fd);
  try {
    return it->second(context);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helper %s: %s\n", argv[2], e.what());
    return 122;
  }
}

std::string self_exe() {
  char path[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0) throw std::runtime_error("readlink /proc/self/exe failed");
  return std::string(path, static_cast<std::size_t>(n));
}

std::pair<Fd, Fd> make_pipe(bool cloexec) {
  int fds[2];
  if (::pipe2(fds, cloexec ? O_CLOEXEC : 0) != 0) throw std::runtime_error("pipe2 failed");
  return {Fd(fds[0]), Fd(fds[1])};
}

Child Child::helper(const std::string& name, SpawnOptions options) {
  std::vector<std::string> argv{self_exe(), kHelperFlag, name};
  argv.insert(argv.end(), options.args.begin(), options.args.end());
  options.args.clear();
  return program(std::move(argv), std::move(options));
}

Child Child::program(std::vector<std::string> argv, SpawnOptions options) {
  argv.insert(argv.end(), options.args.begin(), options.args.end());
  auto [ready_read, ready_write] = make_pipe(true);
  const int n_inherit = static_cast<int>(options.inherit.size());
  // The readiness pipe lands right after the inherited descriptors.
  const int ready_target = 3 + n_inherit;

  // Everything the child needs is built before fork: only async-signal-safe calls after.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, kReadyEnv, std::strlen(kReadyEnv)) != 0) env_strings.emplace_back(*e);
  }
  env_strings.push_back(std::string(kReadyEnv) + "=" + std::to_string(ready_target));
  for (auto& extra : options.env) env_strings.push_back(extra);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<char*> args;
  for (auto& s : argv) args.push_back(s.data());
  args.push_back(nullptr);
  std::vector<int> sources;
  for (auto fd : options.inherit) sources.push_back(fd.get());
  sources.push_back(ready_write.get());
  const pid_t parent = ::getpid();
  const bool close_others = options.close_other_fds;

  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    // Move every source above the target range first so dup2 never clobbers one.
    std::vector<int>& high = sources;
    const int above_targets = 3 + static_cast<int>(high.size());
    for (auto& fd : high) {
      fd = ::fcntl(fd, F_DUPFD, above_targets);
      if (fd < 0) ::_exit(126);
    }
    for (std::size_t i = 0; i < high.size(); ++i) {
      if (::dup2(high[i], 3 + static_cast<int>(i)) < 0) ::_exit(126);
    }
    if (close_others) {
      ::close_range(3 + static_cast<unsigned>(high.size()), ~0U, 0);
    } else {
      for (int fd : high) ::close(fd);
    }
    ::signal(SIGPIPE, SIG_DFL);
    ::execve(args[0], args.data(), envp.data());
    ::_exit(127);
  }
  Child child;
  child.pid_ = pid;
  child.ready_ = std::move(ready_read);
  return child;
}

Child::Child(Child&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      ready_(std::move(other.ready_)),
      buffered_(std::move(other.buffered_)) {}

Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = std::exchange(other.pid_, -1);
    ready_ = std::move(other.ready_);
    buffered_ = std::move(other.buffered_);
  }
  return *this;
}

Child::~Child() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
}

std::string Child::wait_ready(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto newline = buffered_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffered_.substr(0, newline);
      buffered_.erase(0, newline + 1);
      return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ADD_FAILURE() << "helper pid " << pid_ << " not ready in time";
      return {};
    }
    pollfd p{ready_.get(), POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    char chunk[256];
    ssize_t got = ::read(ready_.get(), chunk, sizeof chunk);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      ADD_FAILURE() << "helper pid " << pid_ << " exited before it was ready";
      return {};
    }
    buffered_.append(chunk, static_cast<std::size_t>(got));
  }
}

int Child::wait_exit(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0)));
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (r < 0 && errno != EINTR) return -1;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ADD_FAILURE() << "child pid " << pid_ << " did not exit in time";
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
      return -1;
    }
    // A pidfd becomes readable when the process exits: no polling loop with sleeps.
    pollfd p{pidfd.get(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left.count()));
  }
}

void Child::kill(int signal) const {
  if (pid_ > 0) ::kill(pid_, signal);
}

bool Child::running() {
  if (pid_ <= 0) return false;
  siginfo_t info{};
  // WNOWAIT leaves an exited child reapable by wait_exit().
  if (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
    return false;
  }
  return info.si_pid == 0;
}

std::set<int> open_fds() {
  std::set<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return fds;
  const int own = ::dirfd(dir);
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    int fd = std::atoi(entry->d_name);
    if (fd != own) fds.insert(fd);
  }
  ::closedir(dir);
  return fds;
}

namespace {
// A descriptor number plus what it refers to, so a leak that reuses a number closed during
// the test is still seen.
std::map<int, std::pair<dev_t, ino_t>> open_fd_identities() {
  std::map<int, std::pair<dev_t, ino_t>> identities;
  for (int fd : open_fds()) {
    struct stat st {};
    if (::fstat(fd, &st) == 0) identities[fd] = {st.st_dev, st.st_ino};
  }
  return identities;
}
}  // namespace

void FdLeakTest::SetUp() { before_ = open_fd_identities(); }

void FdLeakTest::TearDown() {
  const auto after = open_fd_identities();
  std::vector<int> leaked;
  for (const auto& [fd, identity] : after) {
    auto it = before_.find(fd);
    if (it == before_.end() || it->second != identity) leaked.push_back(fd);
  }
  if (!leaked.empty()) {
    std::string list;
    for (int fd : leaked) {
      char target[256] = {};
      std::string link = "/proc/self/fd/" + std::to_string(fd);
      ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
      list += " " + std::to_string(fd) + "->" + (n > 0 ? std::string(target, static_cast<std::size_t>(n)) : "?");
    }
    ADD_FAILURE() << "descriptors leaked by this test:" << list;
  }
}

}  // namespace sockshare::test
