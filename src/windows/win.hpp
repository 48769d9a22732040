// Internal pieces of the Windows backend: the owner of kernel handles, errors from
// GetLastError/WSAGetLastError, the clocks, random bytes, and message I/O on a named pipe
// with a deadline.
#pragma once

#include <winsock2.h>
#include <windows.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "sockshare/error.hpp"

namespace sockshare::windows::detail {

// Move-only owner of a kernel HANDLE (pipe, event, process, thread). Sockets have their own
// owner, SocketHandle: closesocket, not CloseHandle, releases a SOCKET.
class Handle {
 public:
  Handle() noexcept = default;
  explicit Handle(HANDLE handle) noexcept : handle_(normal(handle)) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  ~Handle() { reset(); }
  [[nodiscard]] HANDLE get() const noexcept { return handle_; }
  [[nodiscard]] bool valid() const noexcept { return handle_ != nullptr; }
  void reset() noexcept {
    if (handle_ != nullptr) ::CloseHandle(std::exchange(handle_, nullptr));
  }

 private:
  // Some calls report failure as INVALID_HANDLE_VALUE, others as NULL: keep one spelling.
  static HANDLE normal(HANDLE h) noexcept { return h == INVALID_HANDLE_VALUE ? nullptr : h; }
  HANDLE handle_ = nullptr;
};

// "ERROR_PIPE_BUSY (231): All pipe instances are busy." style text for a Windows error code.
[[nodiscard]] std::string describe_error(DWORD code);
// The kind a caller should act on for a Win32 or Winsock error code.
[[nodiscard]] ErrorKind kind_from_win(DWORD code) noexcept;
// Error for `code`; the code is in the message (Error::code() holds errno values only, so 0).
[[nodiscard]] Error win_error(std::string operation, DWORD code, std::string_view detail = {});
[[noreturn]] void throw_last_error(std::string operation);      // GetLastError()
[[noreturn]] void throw_last_wsa_error(std::string operation);  // WSAGetLastError()

// Nanoseconds on CLOCK_MONOTONIC (QueryPerformanceCounter underneath, one clock for the
// machine), the clock of SocketInfo::expires_ns.
[[nodiscard]] std::uint64_t monotonic_ns() noexcept;
// Milliseconds for I/O deadlines.
[[nodiscard]] inline std::uint64_t now_ms() noexcept { return ::GetTickCount64(); }
[[nodiscard]] inline DWORD remaining_ms(std::uint64_t deadline_ms) noexcept {
  const std::uint64_t now = now_ms();
  return now >= deadline_ms ? 0 : static_cast<DWORD>(std::min<std::uint64_t>(deadline_ms - now, 0x7FFFFFFF));
}

void random_bytes(std::span<std::uint8_t> out);  // BCryptGenRandom, system RNG
[[nodiscard]] bool equal_constant_time(std::span<const std::uint8_t> a,
                                       std::span<const std::uint8_t> b) noexcept;

// A process's creation time (FILETIME as 100 ns units), 0 if it cannot be read. Together
// with the pid it names one process: the pair is what the info records as the "inode".
[[nodiscard]] std::uint64_t creation_time(HANDLE process) noexcept;

[[nodiscard]] std::wstring widen(std::string_view ascii);

// Typed messages on a message-mode pipe: u16 type (little-endian), then the payload.
struct PipeMessage {
  std::uint16_t type = 0;
  std::vector<std::byte> payload;
};
inline constexpr std::size_t kMaxPipeMessage = 1024;

// Both wait on overlapped I/O until it completes, `deadline_ms` passes (timed_out) or `stop`
// (may be null) is signalled (the I/O is cancelled; timed_out with detail "stopped").
void write_message(HANDLE pipe, std::uint16_t type, std::span<const std::byte> payload,
                   std::uint64_t deadline_ms, HANDLE stop, std::string_view what);
[[nodiscard]] PipeMessage read_message(HANDLE pipe, std::uint64_t deadline_ms, HANDLE stop,
                                       std::string_view what);

// Family, type and protocol of a socket (SO_PROTOCOL_INFOW). Throws invalid_input for a
// handle that is not a socket.
struct SocketKind {
  int family = 0;
  int type = 0;
  int protocol = 0;
};
[[nodiscard]] SocketKind socket_kind(SOCKET socket);

}  // namespace sockshare::windows::detail
