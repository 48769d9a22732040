#include "win.hpp"

#include <bcrypt.h>
#include <time.h>

#include <cstring>
#include <mutex>

#include "byte_order.hpp"
#include "sockshare/windows/socket_handle.hpp"

namespace sockshare::windows {

void SocketHandle::reset() noexcept {
  // closesocket, never retried: like close() on Linux the handle is gone whatever it reports.
  if (socket_ != INVALID_SOCKET) ::closesocket(std::exchange(socket_, INVALID_SOCKET));
}

void ensure_winsock() {
  static const int status = [] {
    WSADATA data{};
    return ::WSAStartup(MAKEWORD(2, 2), &data);
  }();
  if (status != 0) {
    throw detail::win_error("WSAStartup(2.2)", static_cast<DWORD>(status));
  }
}

namespace detail {

namespace {
std::string_view error_name(DWORD code) {
  switch (code) {
    case ERROR_FILE_NOT_FOUND: return "ERROR_FILE_NOT_FOUND";
    case ERROR_ACCESS_DENIED: return "ERROR_ACCESS_DENIED";
    case ERROR_INVALID_HANDLE: return "ERROR_INVALID_HANDLE";
    case ERROR_INVALID_PARAMETER: return "ERROR_INVALID_PARAMETER";
    case ERROR_BROKEN_PIPE: return "ERROR_BROKEN_PIPE";
    case ERROR_PIPE_BUSY: return "ERROR_PIPE_BUSY";
    case ERROR_NO_DATA: return "ERROR_NO_DATA";
    case ERROR_PIPE_NOT_CONNECTED: return "ERROR_PIPE_NOT_CONNECTED";
    case ERROR_MORE_DATA: return "ERROR_MORE_DATA";
    case ERROR_SEM_TIMEOUT: return "ERROR_SEM_TIMEOUT";
    case ERROR_OPERATION_ABORTED: return "ERROR_OPERATION_ABORTED";
    case ERROR_NOT_ENOUGH_MEMORY: return "ERROR_NOT_ENOUGH_MEMORY";
    case WSAEINVAL: return "WSAEINVAL";
    case WSAENOTSOCK: return "WSAENOTSOCK";
    case WSAEWOULDBLOCK: return "WSAEWOULDBLOCK";
    case WSAECONNRESET: return "WSAECONNRESET";
    case WSAECONNABORTED: return "WSAECONNABORTED";
    case WSAENOTCONN: return "WSAENOTCONN";
    case WSAEMFILE: return "WSAEMFILE";
    case WSAENOBUFS: return "WSAENOBUFS";
    case WSAEACCES: return "WSAEACCES";
    case WSAEPROVIDERFAILEDINIT: return "WSAEPROVIDERFAILEDINIT";
    case WSANOTINITIALISED: return "WSANOTINITIALISED";
    default: return {};
  }
}
}  // namespace

std::string describe_error(DWORD code) {
  std::string text(error_name(code));
  text += text.empty() ? "error " + std::to_string(code) : " (" + std::to_string(code) + ")";
  char buffer[256] = {};
  const DWORD n = ::FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
                                   nullptr, code, 0, buffer, sizeof buffer, nullptr);
  std::string_view message(buffer, n);
  while (!message.empty() && (message.back() == '\n' || message.back() == '\r' ||
                              message.back() == ' ' || message.back() == '.')) {
    message.remove_suffix(1);
  }
  if (!message.empty()) {
    text += ": ";
    text += message;
  }
  return text;
}

ErrorKind kind_from_win(DWORD code) noexcept {
  switch (code) {
    case WSAEWOULDBLOCK:
    case ERROR_IO_PENDING:
      return ErrorKind::would_block;
    case ERROR_SEM_TIMEOUT:
    case WSAETIMEDOUT:
      return ErrorKind::timed_out;
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY:
    case ERROR_NO_SYSTEM_RESOURCES:
    case WSAEMFILE:
    case WSAENOBUFS:
      return ErrorKind::overloaded;
    case ERROR_BROKEN_PIPE:
    case ERROR_NO_DATA:
    case ERROR_PIPE_NOT_CONNECTED:
    case ERROR_FILE_NOT_FOUND:
    case WSAECONNRESET:
    case WSAECONNABORTED:
    case WSAENOTCONN:
      return ErrorKind::peer_gone;
    case ERROR_ACCESS_DENIED:
    case WSAEACCES:
    case WSAECONNREFUSED:
      return ErrorKind::refused;
    case ERROR_INVALID_HANDLE:
    case ERROR_INVALID_PARAMETER:
    case WSAEINVAL:
    case WSAENOTSOCK:
    case WSAEFAULT:
      return ErrorKind::invalid_input;
    default:
      return ErrorKind::system;
  }
}

Error win_error(std::string operation, DWORD code, std::string_view detail) {
  std::string text = describe_error(code);
  if (!detail.empty()) {
    text += "; ";
    text += detail;
  }
  return Error(kind_from_win(code), 0, std::move(operation), text);
}

void throw_last_error(std::string operation) {
  throw win_error(std::move(operation), ::GetLastError());
}

void throw_last_wsa_error(std::string operation) {
  throw win_error(std::move(operation), static_cast<DWORD>(::WSAGetLastError()));
}

std::uint64_t monotonic_ns() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000U +
         static_cast<std::uint64_t>(now.tv_nsec);
}

void random_bytes(std::span<std::uint8_t> out) {
  const NTSTATUS status = ::BCryptGenRandom(nullptr, out.data(), static_cast<ULONG>(out.size()),
                                            BCRYPT_USE_SYSTEM_PREFERRED_RNG);
  if (status < 0) {
    throw Error(ErrorKind::system, 0, "BCryptGenRandom",
                "NTSTATUS " + std::to_string(static_cast<unsigned long>(status)));
  }
}

bool equal_constant_time(std::span<const std::uint8_t> a,
                         std::span<const std::uint8_t> b) noexcept {
  if (a.size() != b.size()) return false;
  volatile std::uint8_t diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i) diff = diff | static_cast<std::uint8_t>(a[i] ^ b[i]);
  return diff == 0;
}

std::uint64_t creation_time(HANDLE process) noexcept {
  FILETIME created{}, exited{}, kernel{}, user{};
  if (!::GetProcessTimes(process, &created, &exited, &kernel, &user)) return 0;
  return (static_cast<std::uint64_t>(created.dwHighDateTime) << 32) | created.dwLowDateTime;
}

std::wstring widen(std::string_view ascii) {
  return std::wstring(ascii.begin(), ascii.end());
}

namespace {

// Waits for overlapped I/O started on `pipe`; returns the byte count or throws.
DWORD finish_io(HANDLE pipe, OVERLAPPED& ov, BOOL started, std::uint64_t deadline_ms,
                HANDLE stop, const std::string& operation) {
  if (!started) {
    const DWORD err = ::GetLastError();
    if (err != ERROR_IO_PENDING) throw win_error(operation, err);
    HANDLE waits[2] = {ov.hEvent, stop};
    const DWORD count = stop != nullptr ? 2 : 1;
    const DWORD r = ::WaitForMultipleObjects(count, waits, FALSE, remaining_ms(deadline_ms));
    if (r != WAIT_OBJECT_0) {
      // Cancel, then wait for the cancellation: the OVERLAPPED lives on our stack.
      ::CancelIoEx(pipe, &ov);
      DWORD ignored = 0;
      ::GetOverlappedResult(pipe, &ov, &ignored, TRUE);
      throw Error(ErrorKind::timed_out, 0, operation,
                  r == WAIT_OBJECT_0 + 1 ? "stopped" : "no answer before the deadline");
    }
  }
  DWORD n = 0;
  if (!::GetOverlappedResult(pipe, &ov, &n, FALSE)) {
    const DWORD err = ::GetLastError();
    if (err == ERROR_MORE_DATA) {
      throw Error(ErrorKind::protocol, 0, operation, "message larger than any grant message");
    }
    throw win_error(operation, err);
  }
  return n;
}

struct IoEvent {
  IoEvent() : event(::CreateEventW(nullptr, TRUE, FALSE, nullptr)) {
    if (!event.valid()) throw_last_error("CreateEventW");
  }
  Handle event;
};

}  // namespace

void write_message(HANDLE pipe, std::uint16_t type, std::span<const std::byte> payload,
                   std::uint64_t deadline_ms, HANDLE stop, std::string_view what) {
  std::vector<std::byte> frame(2 + payload.size());
  bytes::store_le(frame.data(), type);
  if (!payload.empty()) std::memcpy(frame.data() + 2, payload.data(), payload.size());
  IoEvent io;
  OVERLAPPED ov{};
  ov.hEvent = io.event.get();
  const std::string operation = "WriteFile(grant pipe, " + std::string(what) + ")";
  const BOOL ok = ::WriteFile(pipe, frame.data(), static_cast<DWORD>(frame.size()), nullptr, &ov);
  const DWORD n = finish_io(pipe, ov, ok, deadline_ms, stop, operation);
  if (n != frame.size()) throw Error(ErrorKind::protocol, 0, operation, "short write");
}

PipeMessage read_message(HANDLE pipe, std::uint64_t deadline_ms, HANDLE stop,
                         std::string_view what) {
  std::array<std::byte, kMaxPipeMessage> buffer{};
  IoEvent io;
  OVERLAPPED ov{};
  ov.hEvent = io.event.get();
  const std::string operation = "ReadFile(grant pipe, " + std::string(what) + ")";
  const BOOL ok = ::ReadFile(pipe, buffer.data(), static_cast<DWORD>(buffer.size()), nullptr, &ov);
  const DWORD n = finish_io(pipe, ov, ok, deadline_ms, stop, operation);
  if (n < 2) {
    throw Error(n == 0 ? ErrorKind::peer_gone : ErrorKind::protocol, 0, operation,
                n == 0 ? "the other side closed the pipe" : "message shorter than its type");
  }
  PipeMessage message;
  message.type = bytes::load_le<std::uint16_t>(buffer.data());
  message.payload.assign(buffer.begin() + 2, buffer.begin() + n);
  return message;
}

SocketKind socket_kind(SOCKET socket) {
  WSAPROTOCOL_INFOW info{};
  int len = sizeof info;
  if (::getsockopt(socket, SOL_SOCKET, SO_PROTOCOL_INFOW, reinterpret_cast<char*>(&info), &len) !=
      0) {
    const DWORD err = static_cast<DWORD>(::WSAGetLastError());
    throw Error(ErrorKind::invalid_input, 0,
                "getsockopt(socket " + std::to_string(static_cast<std::uint64_t>(socket)) +
                    ", SO_PROTOCOL_INFOW)",
                describe_error(err) + "; not a socket?");
  }
  return {info.iAddressFamily, info.iSocketType, info.iProtocol};
}

}  // namespace detail
}  // namespace sockshare::windows
