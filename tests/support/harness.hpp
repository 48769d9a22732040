// Multi-process test harness: the test binary re-executes itself as a named helper,
// readiness comes back over a pipe (no sleeps), and a Child's destructor kills and reaps.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "sockshare/fd.hpp"

namespace sockshare::test {

// What a helper process gets: its arguments, and descriptors the parent mapped to 3, 4, ...
class HelperContext {
public:
  HelperContext(std::vector<std::string> args, int ready_fd)
      : args_(std::move(args)), ready_fd_(ready_fd) {}
  [[nodiscard]] const std::vector<std::string>& args() const { return args_; }
  // The descriptor the parent passed as inherit[index], now owned by the helper.
  [[nodiscard]] Fd take_fd(int index) const { return Fd(3 + index); }
  // Tells the parent the helper is ready; `line` (no newline) reaches Child::wait_ready.
  void ready(std::string_view line = "ready") const;

private:
  std::vector<std::string> args_;
  int ready_fd_;
};

using HelperFunction = int (*)(HelperContext&);

struct HelperRegistration {
  HelperRegistration(const char* name, HelperFunction function);
};

// Defines a helper the tests can spawn by name. The body returns the exit status.
#define SOCKSHARE_HELPER(name)                                                   \
  static int name##_helper_body(::sockshare::test::HelperContext& ctx);          \
  static const ::sockshare::test::HelperRegistration name##_helper_registration( \
      #name, &name##_helper_body);                                               \
  static int name##_helper_body([[maybe_unused]] ::sockshare::test::HelperContext& ctx)

// Runs a helper if argv asks for one; returns -1 otherwise. Called first thing by main().
int run_helper_if_requested(int argc, char** argv);

struct SpawnOptions {
  std::vector<std::string> args = {};
  std::vector<BorrowedFd> inherit = {};  // become fds 3, 4, ... in the child, in this order
  std::vector<std::string> env = {};     // extra NAME=value entries
  // false: leave every other descriptor of the parent to close-on-exec alone, so a test
  // can prove which descriptors a real exec would leak (R7).
  bool close_other_fds = true;
};

// A child process. Killed with SIGKILL and reaped when destroyed if still running; it also
// dies with the test process (PR_SET_PDEATHSIG), so a crashed test leaves nothing behind.
class Child {
public:
  Child() = default;
  // Spawns this test binary as helper `name`.
  static Child helper(const std::string& name, SpawnOptions options = {});
  // Spawns any program (argv[0] is the path), with the same fd mapping and readiness pipe.
  static Child program(std::vector<std::string> argv, SpawnOptions options = {});
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child();

  [[nodiscard]] pid_t pid() const { return pid_; }
  // The line the helper passed to ready(); fails the test on timeout or early exit.
  std::string wait_ready(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // Waits for exit: the exit status, or 128 + signal number for a killed child. Kills the
  // child and fails the test on timeout.
  int wait_exit(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  void kill(int signal) const;
  [[nodiscard]] bool running();

private:
  pid_t pid_ = -1;
  Fd ready_;
  std::string buffered_;
};

// The descriptors open in this process right now (from /proc/self/fd).
std::set<int> open_fds();

// Fixture for every test that moves descriptors: fails the test if any descriptor opened
// during it is still open at the end.
class FdLeakTest : public ::testing::Test {
protected:
  void SetUp() override;
  void TearDown() override;

private:
  std::map<int, std::pair<dev_t, ino_t>> before_;
};

// A pipe with both ends close-on-exec unless `cloexec` is false.
std::pair<Fd, Fd> make_pipe(bool cloexec = true);

// Path of this test binary.
std::string self_exe();

}  // namespace sockshare::test
