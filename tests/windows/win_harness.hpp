// Multi-process harness for the Windows tests (the Windows twin of tests/support/harness.hpp):
// the test program re-runs itself as a named helper with CreateProcessW, and parent and
// helper exchange lines over a private duplex named pipe (readiness, commands, results; no
// sleeps). A Child's destructor terminates and waits for the helper.
#pragma once

#include <winsock2.h>
#include <windows.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sockshare::wintest {

// The helper's side: its arguments and the line pipe to the parent.
class HelperContext {
 public:
  HelperContext(std::vector<std::string> args, HANDLE pipe) : args_(std::move(args)), pipe_(pipe) {}
  [[nodiscard]] const std::vector<std::string>& args() const { return args_; }
  void send(std::string_view line) const;  // one line (no newline) to the parent
  // The next line from the parent; empty when the parent has gone.
  [[nodiscard]] std::string receive();

 private:
  std::vector<std::string> args_;
  HANDLE pipe_;
  std::string buffered_;
};

using HelperFunction = int (*)(HelperContext&);

struct HelperRegistration {
  HelperRegistration(const char* name, HelperFunction function);
};

#define SOCKSHARE_WIN_HELPER(name)                                                  \
  static int name##_helper_body(::sockshare::wintest::HelperContext& ctx);          \
  static const ::sockshare::wintest::HelperRegistration name##_helper_registration( \
      #name, &name##_helper_body);                                                  \
  static int name##_helper_body([[maybe_unused]] ::sockshare::wintest::HelperContext& ctx)

// Runs a helper if argv asks for one; returns -1 otherwise. Called first thing by main().
int run_helper_if_requested(int argc, char** argv);

class Child {
 public:
  Child() = default;
  // Starts this test program as helper `name`; `env` adds NAME=value entries.
  static Child helper(const std::string& name, const std::vector<std::string>& args = {},
                      const std::vector<std::string>& env = {});
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child();

  [[nodiscard]] DWORD pid() const { return pid_; }
  void send(std::string_view line);
  // The next line from the helper; fails the test (and returns "") on timeout or exit.
  std::string receive(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // Sends `command` and returns the helper's answer.
  std::string ask(std::string_view command,
                  std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // The exit code; terminates the helper and fails the test on timeout.
  DWORD wait_exit(std::chrono::milliseconds timeout = std::chrono::seconds(20));

 private:
  void close() noexcept;
  HANDLE process_ = nullptr;
  HANDLE pipe_ = nullptr;
  HANDLE event_ = nullptr;
  DWORD pid_ = 0;
  bool connected_ = false;
  std::string buffered_;
};

}  // namespace sockshare::wintest
