#include "win_harness.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <utility>

namespace sockshare::wintest {
namespace {

constexpr std::string_view kHelperFlag = "--sockshare-win-helper";

std::map<std::string, HelperFunction>& registry() {
  static std::map<std::string, HelperFunction> helpers;
  return helpers;
}

std::wstring widen(std::string_view s) { return std::wstring(s.begin(), s.end()); }

std::wstring self_path() {
  std::wstring path(32768, L'\0');
  const DWORD n = ::GetModuleFileNameW(nullptr, path.data(), static_cast<DWORD>(path.size()));
  path.resize(n);
  return path;
}

// Arguments here never contain quotes; quoting keeps spaces in paths intact.
std::wstring quote(std::wstring_view arg) { return L"\"" + std::wstring(arg) + L"\""; }

// Waits for overlapped I/O on `handle` until `timeout_ms`; false on timeout (I/O cancelled).
bool wait_io(HANDLE handle, OVERLAPPED& ov, DWORD timeout_ms, DWORD& bytes) {
  if (::WaitForSingleObject(ov.hEvent, timeout_ms) != WAIT_OBJECT_0) {
    ::CancelIoEx(handle, &ov);
    ::GetOverlappedResult(handle, &ov, &bytes, TRUE);
    return false;
  }
  return ::GetOverlappedResult(handle, &ov, &bytes, FALSE) != FALSE;
}

}  // namespace

HelperRegistration::HelperRegistration(const char* name, HelperFunction function) {
  registry()[name] = function;
}

void HelperContext::send(std::string_view line) const {
  std::string text(line);
  text += '\n';
  DWORD written = 0;
  ::WriteFile(pipe_, text.data(), static_cast<DWORD>(text.size()), &written, nullptr);
}

std::string HelperContext::receive() {
  for (;;) {
    const auto nl = buffered_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffered_.substr(0, nl);
      buffered_.erase(0, nl + 1);
      return line;
    }
    char chunk[512];
    DWORD n = 0;
    if (!::ReadFile(pipe_, chunk, sizeof chunk, &n, nullptr) || n == 0) return {};
    buffered_.append(chunk, n);
  }
}

int run_helper_if_requested(int argc, char** argv) {
  if (argc < 4 || argv[1] != kHelperFlag) return -1;
  const auto it = registry().find(argv[2]);
  if (it == registry().end()) return 127;
  HANDLE pipe = ::CreateFileW(widen(argv[3]).c_str(), GENERIC_READ | GENERIC_WRITE, 0, nullptr,
                              OPEN_EXISTING, 0, nullptr);
  if (pipe == INVALID_HANDLE_VALUE) return 126;
  std::vector<std::string> args(argv + 4, argv + argc);
  HelperContext ctx(std::move(args), pipe);
  const int status = it->second(ctx);
  ::CloseHandle(pipe);
  return status;
}

Child Child::helper(const std::string& name, const std::vector<std::string>& args,
                    const std::vector<std::string>& env) {
  static std::atomic<unsigned> counter{0};
  Child child;
  const std::string pipe_name = "\\\\.\\pipe\\sockshare-test-" +
                                std::to_string(::GetCurrentProcessId()) + "-" +
                                std::to_string(counter++) + "-" + std::to_string(::GetTickCount64());
  child.pipe_ = ::CreateNamedPipeW(widen(pipe_name).c_str(),
                                   PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE,
                                   PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT, 1, 4096, 4096, 0,
                                   nullptr);
  if (child.pipe_ == INVALID_HANDLE_VALUE) {
    child.pipe_ = nullptr;
    ADD_FAILURE() << "CreateNamedPipeW failed: " << ::GetLastError();
    return child;
  }
  child.event_ = ::CreateEventW(nullptr, TRUE, FALSE, nullptr);

  std::wstring command = quote(self_path()) + L" " + widen(kHelperFlag) + L" " + quote(widen(name)) +
                         L" " + quote(widen(pipe_name));
  for (const std::string& arg : args) command += L" " + quote(widen(arg));

  // The environment block: ours plus the extra entries.
  std::wstring block;
  if (LPWCH current = ::GetEnvironmentStringsW()) {
    for (LPWCH p = current; *p != L'\0'; p += wcslen(p) + 1) block.append(p, wcslen(p) + 1);
    ::FreeEnvironmentStringsW(current);
  }
  for (const std::string& entry : env) block += widen(entry) + L'\0';
  block += L'\0';

  STARTUPINFOW si{};
  si.cb = sizeof si;
  PROCESS_INFORMATION pi{};
  // No handle inheritance at all: the helper opens the line pipe by name, and sockets reach
  // it only through sockshare.
  if (!::CreateProcessW(nullptr, command.data(), nullptr, nullptr, FALSE,
                        CREATE_UNICODE_ENVIRONMENT, block.data(), nullptr, &si, &pi)) {
    ADD_FAILURE() << "CreateProcessW failed: " << ::GetLastError();
    return child;
  }
  ::CloseHandle(pi.hThread);
  child.process_ = pi.hProcess;
  child.pid_ = pi.dwProcessId;
  return child;
}

Child::Child(Child&& other) noexcept
    : process_(std::exchange(other.process_, nullptr)),
      pipe_(std::exchange(other.pipe_, nullptr)),
      event_(std::exchange(other.event_, nullptr)),
      pid_(std::exchange(other.pid_, 0)),
      connected_(std::exchange(other.connected_, false)),
      buffered_(std::move(other.buffered_)) {}

Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    close();
    process_ = std::exchange(other.process_, nullptr);
    pipe_ = std::exchange(other.pipe_, nullptr);
    event_ = std::exchange(other.event_, nullptr);
    pid_ = std::exchange(other.pid_, 0);
    connected_ = std::exchange(other.connected_, false);
    buffered_ = std::move(other.buffered_);
  }
  return *this;
}

Child::~Child() { close(); }

void Child::close() noexcept {
  if (process_ != nullptr) {
    if (::WaitForSingleObject(process_, 0) != WAIT_OBJECT_0) {
      ::TerminateProcess(process_, 137);
      ::WaitForSingleObject(process_, 10000);
    }
    ::CloseHandle(process_);
    process_ = nullptr;
  }
  if (pipe_ != nullptr) ::CloseHandle(std::exchange(pipe_, nullptr));
  if (event_ != nullptr) ::CloseHandle(std::exchange(event_, nullptr));
}

void Child::send(std::string_view line) {
  if (pipe_ == nullptr) return;
  if (!connected_) (void)receive(std::chrono::milliseconds(0));
  std::string text(line);
  text += '\n';
  OVERLAPPED ov{};
  ov.hEvent = event_;
  ::ResetEvent(event_);
  DWORD n = 0;
  if (!::WriteFile(pipe_, text.data(), static_cast<DWORD>(text.size()), nullptr, &ov) &&
      ::GetLastError() != ERROR_IO_PENDING) {
    ADD_FAILURE() << "writing to helper " << pid_ << " failed: " << ::GetLastError();
    return;
  }
  if (!wait_io(pipe_, ov, 20000, n)) ADD_FAILURE() << "writing to helper " << pid_ << " timed out";
}

std::string Child::receive(std::chrono::milliseconds timeout) {
  if (pipe_ == nullptr) return {};
  const std::uint64_t deadline = ::GetTickCount64() + static_cast<std::uint64_t>(timeout.count());
  auto left = [&]() -> DWORD {
    const std::uint64_t now = ::GetTickCount64();
    return now >= deadline ? 0 : static_cast<DWORD>(deadline - now);
  };
  if (!connected_) {
    OVERLAPPED ov{};
    ov.hEvent = event_;
    ::ResetEvent(event_);
    BOOL ok = ::ConnectNamedPipe(pipe_, &ov);
    DWORD err = ok ? ERROR_SUCCESS : ::GetLastError();
    if (err == ERROR_IO_PENDING) {
      // The helper exiting before it connects must not cost the whole timeout.
      HANDLE waits[2] = {event_, process_};
      const DWORD r = ::WaitForMultipleObjects(2, waits, FALSE, timeout.count() == 0 ? 20000 : left());
      DWORD ignored = 0;
      if (r != WAIT_OBJECT_0) {
        ::CancelIoEx(pipe_, &ov);
        ::GetOverlappedResult(pipe_, &ov, &ignored, TRUE);
        ADD_FAILURE() << "helper " << pid_ << " never connected its line pipe";
        return {};
      }
      ok = ::GetOverlappedResult(pipe_, &ov, &ignored, FALSE);
      err = ok ? ERROR_SUCCESS : ::GetLastError();
    }
    if (err != ERROR_SUCCESS && err != ERROR_PIPE_CONNECTED) {
      ADD_FAILURE() << "ConnectNamedPipe failed: " << err;
      return {};
    }
    connected_ = true;
    if (timeout.count() == 0) return {};
  }
  for (;;) {
    const auto nl = buffered_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffered_.substr(0, nl);
      buffered_.erase(0, nl + 1);
      return line;
    }
    char chunk[512];
    OVERLAPPED ov{};
    ov.hEvent = event_;
    ::ResetEvent(event_);
    DWORD n = 0;
    const BOOL ok = ::ReadFile(pipe_, chunk, sizeof chunk, nullptr, &ov);
    if (!ok && ::GetLastError() != ERROR_IO_PENDING) {
      ADD_FAILURE() << "helper " << pid_ << " closed its line pipe (exited?) before answering";
      return {};
    }
    if (!wait_io(pipe_, ov, left(), n) || n == 0) {
      ADD_FAILURE() << "no line from helper " << pid_ << " in time (or it exited)";
      return {};
    }
    buffered_.append(chunk, n);
  }
}

std::string Child::ask(std::string_view command, std::chrono::milliseconds timeout) {
  send(command);
  return receive(timeout);
}

DWORD Child::wait_exit(std::chrono::milliseconds timeout) {
  if (process_ == nullptr) return 255;
  if (::WaitForSingleObject(process_, static_cast<DWORD>(timeout.count())) != WAIT_OBJECT_0) {
    ADD_FAILURE() << "helper " << pid_ << " did not exit in time";
    ::TerminateProcess(process_, 137);
    ::WaitForSingleObject(process_, 10000);
  }
  DWORD code = 255;
  ::GetExitCodeProcess(process_, &code);
  return code;
}

}  // namespace sockshare::wintest
