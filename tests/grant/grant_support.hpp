// Shared pieces of the grant tests: loopback connections, line I/O over pipes, and a log of
// GrantServer events that a test can wait on.
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "sockshare/grant.hpp"
#include "sockshare/socket.hpp"
#include "support/harness.hpp"

namespace sockshare::grant_test {

// A connected loopback TCP pair: `client` is the remote peer, `server` the accepted socket
// that gets shared.
struct TcpPair {
  Fd client;
  Fd server;
};

inline TcpPair tcp_pair() {
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"), {.backlog = 4, .nonblocking = false});
  TcpPair pair;
  pair.client = connect_to(local_endpoint(listener.borrow()));
  pair.server = Fd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!pair.server.valid()) throw std::runtime_error("accept4 failed");
  return pair;
}

inline void write_all(BorrowedFd fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::send(fd.get(), text.data(), text.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOTSOCK) {
      const ssize_t w = ::write(fd.get(), text.data(), text.size());
      if (w <= 0) throw std::runtime_error("write failed");
      text.remove_prefix(static_cast<std::size_t>(w));
      continue;
    }
    if (n <= 0) throw std::runtime_error("send failed: " + std::string(std::strerror(errno)));
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

// Reads one line (without the newline); empty at end of file.
inline std::string read_line(BorrowedFd fd) {
  std::string line;
  char c = 0;
  for (;;) {
    const ssize_t n = ::read(fd.get(), &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || c == '\n') return line;
    line += c;
  }
}

// Waits up to `timeout` for data or EOF; returns what read() gave ("" for EOF), or nullopt
// when nothing happened in time.
inline std::optional<std::string> read_within(BorrowedFd fd, std::chrono::milliseconds timeout) {
  pollfd p{fd.get(), POLLIN, 0};
  int n = 0;
  do {
    n = ::poll(&p, 1, static_cast<int>(timeout.count()));
  } while (n < 0 && errno == EINTR);
  if (n <= 0) return std::nullopt;
  char buffer[512];
  const ssize_t got = ::recv(fd.get(), buffer, sizeof buffer, MSG_DONTWAIT);
  if (got < 0) return std::string("error:") + std::strerror(errno);
  return std::string(buffer, static_cast<std::size_t>(got));
}

inline std::uint64_t inode_of(BorrowedFd fd) {
  return identify(fd).inode;
}

// Collects GrantEvents from the serving thread.
class EventLog {
 public:
  std::function<void(GrantEvent&)> callback() {
    return [this](GrantEvent& event) {
      std::lock_guard lock(mutex_);
      events_.push_back(std::move(event));
      changed_.notify_all();
    };
  }
  // Waits until `count` events have arrived; returns false on timeout.
  bool wait_for(std::size_t count, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, timeout, [&] { return events_.size() >= count; });
  }
  std::vector<GrantEvent> take() {
    std::lock_guard lock(mutex_);
    std::vector<GrantEvent> out;
    out.swap(events_);
    return out;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<GrantEvent> events_;
};

}  // namespace sockshare::grant_test
