// SOCKET ownership on Windows: the Fd of the Windows backend. One owner type per native
// handle kind: SocketHandle closes a SOCKET (closesocket), nothing else does.
#pragma once

#include <winsock2.h>

#include <utility>

namespace sockshare::windows {

// A non-owning reference to a socket. Explicit so a SOCKET never silently becomes one.
class BorrowedSocket {
 public:
  constexpr BorrowedSocket() noexcept = default;
  constexpr explicit BorrowedSocket(SOCKET socket) noexcept : socket_(socket) {}
  [[nodiscard]] constexpr SOCKET get() const noexcept { return socket_; }
  [[nodiscard]] constexpr bool valid() const noexcept { return socket_ != INVALID_SOCKET; }
  friend constexpr bool operator==(BorrowedSocket, BorrowedSocket) = default;

 private:
  SOCKET socket_ = INVALID_SOCKET;
};

// Move-only owner of one SOCKET; closes it exactly once.
class SocketHandle {
 public:
  constexpr SocketHandle() noexcept = default;
  constexpr explicit SocketHandle(SOCKET socket) noexcept : socket_(socket) {}
  SocketHandle(const SocketHandle&) = delete;
  SocketHandle& operator=(const SocketHandle&) = delete;
  SocketHandle(SocketHandle&& other) noexcept
      : socket_(std::exchange(other.socket_, INVALID_SOCKET)) {}
  SocketHandle& operator=(SocketHandle&& other) noexcept {
    if (this != &other) {
      reset();
      socket_ = std::exchange(other.socket_, INVALID_SOCKET);
    }
    return *this;
  }
  ~SocketHandle() { reset(); }

  [[nodiscard]] SOCKET get() const noexcept { return socket_; }
  [[nodiscard]] bool valid() const noexcept { return socket_ != INVALID_SOCKET; }
  [[nodiscard]] BorrowedSocket borrow() const noexcept { return BorrowedSocket(socket_); }
  // Gives up ownership; the caller must closesocket the result.
  [[nodiscard]] SOCKET release() noexcept { return std::exchange(socket_, INVALID_SOCKET); }
  void reset() noexcept;

  explicit operator bool() const = delete;

 private:
  SOCKET socket_ = INVALID_SOCKET;
};

// Starts Winsock 2.2 once per process (WSAStartup is reference counted; the library's
// reference is held until exit). Every sockshare::windows entry point calls it; call it
// yourself before creating sockets if you have not called WSAStartup.
void ensure_winsock();

}  // namespace sockshare::windows
