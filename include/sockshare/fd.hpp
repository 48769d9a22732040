// Descriptor ownership: the only type in sockshare that closes a file descriptor.
#pragma once

#include <utility>

namespace sockshare {

// A non-owning reference to a descriptor, for APIs that only look at or send one.
// Explicit in both directions so an int never silently becomes a descriptor.
class BorrowedFd {
public:
  constexpr BorrowedFd() noexcept = default;
  constexpr explicit BorrowedFd(int fd) noexcept : fd_(fd) {}
  [[nodiscard]] constexpr int get() const noexcept { return fd_; }
  [[nodiscard]] constexpr bool valid() const noexcept { return fd_ >= 0; }
  friend constexpr bool operator==(BorrowedFd, BorrowedFd) = default;

private:
  int fd_ = -1;
};

// Move-only owner of one descriptor. Closes it exactly once, never retrying close() on
// EINTR: on Linux the descriptor is already gone when close() reports EINTR, and a retry
// could close a descriptor another thread has just been given.
class Fd {
public:
  constexpr Fd() noexcept = default;
  constexpr explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
  [[nodiscard]] BorrowedFd borrow() const noexcept { return BorrowedFd(fd_); }
  // Gives up ownership; the caller must close the result.
  [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
  void reset() noexcept;

  // A second owner of the same open file description, close-on-exec.
  [[nodiscard]] Fd duplicate() const;

  explicit operator bool() const = delete;

private:
  int fd_ = -1;
};

}  // namespace sockshare
