// Shared pieces of the grant tests: loopback connections, line I/O over pipes, a log of
// GrantServer events that a test can wait on, and the redeemer helper's driver.
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "sockshare/error.hpp"
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

// A redeemer helper with its control pipe: lines written to `control` reach the helper.
struct Redeemer {
  test::Child child;
  Fd control;

  static Redeemer start(const std::string& how = "pipe", const std::string& speed = "slow") {
    auto [r, w] = test::make_pipe();
    Redeemer out;
    out.child =
        test::Child::helper("redeemer", {.args = {how, speed}, .inherit = {r.borrow()}, .env = {}});
    out.control = std::move(w);
    EXPECT_EQ(out.child.wait_ready(), "waiting");
    return out;
  }
  void send(const std::string& line) { write_all(control.borrow(), line + "\n"); }
  std::string ask(const std::string& command) {
    send(command);
    return child.wait_ready();
  }
  // Ends the helper and expects a clean exit.
  void finish() {
    control.reset();
    EXPECT_EQ(child.wait_exit(), 0);
  }
};

inline std::string ok_line(BorrowedFd socket) {
  const SocketIdentity id = identify(socket);
  return "ok " + std::to_string(id.inode) + " " + std::to_string(id.cookie);
}

inline void expect_error(const std::function<void()>& call, ErrorKind kind,
                         const std::string& text) {
  try {
    call();
    ADD_FAILURE() << "no error; expected " << to_string(kind) << " containing \"" << text << "\"";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

// Whether this environment lets a process use pidfd_getfd on a sibling at all: not under
// Yama ptrace_scope >= 2, nor where seccomp filters the call (it fails even on ourselves).
inline bool pidfd_getfd_possible() {
  std::ifstream yama("/proc/sys/kernel/yama/ptrace_scope");
  int scope = 0;
  if (yama >> scope && scope >= 2) return false;
  Fd self(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  Fd copy(static_cast<int>(::syscall(SYS_pidfd_getfd, self.get(), 1, 0)));
  return copy.valid();
}

}  // namespace sockshare::grant_test
