// Shared pieces of the dispatch tests: loopback clients driven without blocking, so one
// thread can run the dispatcher and many clients at once; a worker's reply format.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "sockshare/dispatch.hpp"
#include "support/harness.hpp"

namespace sockshare::test {

// A client connection: connects (blocking: loopback completes without the server's accept),
// sends its request, then collects the reply without blocking until end of stream.
class Client {
public:
  Client(const Endpoint& endpoint, const std::string& request, const char* source_ip = nullptr) {
    if (source_ip != nullptr) {
      fd_ = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_in src{};
      src.sin_family = AF_INET;
      ::inet_pton(AF_INET, source_ip, &src.sin_addr);
      if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
        throw std::runtime_error("bind client to " + std::string(source_ip));
      }
      sockaddr_in dst{};
      dst.sin_family = AF_INET;
      dst.sin_port = htons(endpoint.port);
      ::inet_pton(AF_INET, endpoint.host.c_str(), &dst.sin_addr);
      if (::connect(fd_.get(), reinterpret_cast<sockaddr*>(&dst), sizeof dst) != 0) {
        throw std::runtime_error("connect from " + std::string(source_ip));
      }
    } else {
      fd_ = connect_to(endpoint);
    }
    if (!request.empty() &&
        ::send(fd_.get(), request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
      throw std::runtime_error("client send");
    }
    set_nonblocking(fd_.borrow(), true);
  }

  // Reads what is there; true once the reply line is complete (or end of stream / reset).
  // A line suffices: a copy of the connection may still sit unread in a dead worker's queue.
  bool advance() {
    if (done_ || has_line()) return true;
    char buf[512];
    for (;;) {
      const ssize_t n = ::read(fd_.get(), buf, sizeof buf);
      if (n > 0) {
        reply_.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0) {
        done_ = true;
      } else if (errno != EAGAIN && errno != EINTR) {
        done_ = true;
        reset_ = true;
      }
      return done_ || has_line();
    }
  }
  [[nodiscard]] bool has_line() const { return reply_.find('\n') != std::string::npos; }
  [[nodiscard]] bool done() const { return done_; }
  [[nodiscard]] bool reset() const { return reset_; }
  [[nodiscard]] const std::string& reply() const { return reply_; }
  // Its own address as the server sees it: "127.0.0.1:50312".
  [[nodiscard]] std::string local_address() const { return local_endpoint(fd_.borrow()).to_string(); }
  void send_more(const std::string& text) {
    ASSERT_EQ(::send(fd_.get(), text.data(), text.size(), MSG_NOSIGNAL), static_cast<ssize_t>(text.size()));
  }
  // "key=value" from the reply line, empty when absent.
  [[nodiscard]] std::string field(const std::string& key) const {
    const std::string needle = key + "=";
    auto at = reply_.find(needle);
    if (at == std::string::npos) return {};
    at += needle.size();
    auto end = reply_.find_first_of(" \n", at);
    return reply_.substr(at, end == std::string::npos ? std::string::npos : end - at);
  }

private:
  Fd fd_;
  std::string reply_;
  bool done_ = false;
  bool reset_ = false;
};

// Runs the dispatcher's loop (and `tick`) until `done` holds or the timeout passes.
inline bool pump(dispatch::Dispatcher& d, const std::function<bool()>& done,
                 std::chrono::milliseconds timeout = std::chrono::seconds(10),
                 const std::function<void()>& tick = {}) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    d.run_once(std::chrono::milliseconds(5));
    if (tick) tick();
  }
  return done();
}

inline bool all_done(std::vector<Client>& clients) {
  bool all = true;
  for (auto& c : clients) all = c.advance() && all;
  return all;
}

inline std::map<std::string, int> count_by(const std::vector<Client>& clients, const std::string& key) {
  std::map<std::string, int> out;
  for (const auto& c : clients) ++out[c.field(key)];
  return out;
}

// The invariant every test ends with once nothing is in flight: each accepted connection
// was either acknowledged by a worker or counted as dropped.
// Replies can reach a client before the dispatcher has read the ack that preceded them:
// runs the loop until nothing is in flight (or 5 s passed).
inline void settle(dispatch::Dispatcher& d) {
  pump(d, [&] { return d.stats().in_flight == 0 && d.stats().pending == 0; }, std::chrono::seconds(5));
}

inline void expect_accounted(dispatch::Dispatcher& d) {
  settle(d);
  const dispatch::Stats s = d.stats();
  EXPECT_EQ(s.in_flight, 0u);
  EXPECT_EQ(s.pending, 0u);
  EXPECT_EQ(s.accepted, s.acknowledged + s.dropped)
      << "accepted " << s.accepted << " acknowledged " << s.acknowledged << " dropped " << s.dropped;
}

// Serves one connection as the test workers do: the request line (the first bytes the
// dispatcher read, then the rest), then one reply line naming who served it.
inline std::string reply_line(const dispatch::Connection& c, std::uint32_t index, const std::string& request) {
  return "w=" + std::to_string(index) + " pid=" + std::to_string(::getpid()) + " peer=" + c.info.peer +
         " l=" + c.info.listener + " first=" + std::to_string(c.info.initial_bytes.size()) + " req=" +
         request + "\n";
}

inline std::string read_request(const dispatch::Connection& c) {
  std::string request(reinterpret_cast<const char*>(c.info.initial_bytes.data()), c.info.initial_bytes.size());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (request.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
    pollfd p{c.socket.get(), POLLIN, 0};
    ::poll(&p, 1, 100);
    char buf[256];
    const ssize_t n = ::read(c.socket.get(), buf, sizeof buf);
    if (n == 0) break;
    if (n > 0) request.append(buf, static_cast<std::size_t>(n));
    else if (errno != EAGAIN && errno != EINTR) break;
  }
  if (auto nl = request.find('\n'); nl != std::string::npos) request.resize(nl);
  return request;
}

inline void write_all(const Fd& fd, const std::string& text) {
  std::size_t off = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (off < text.size() && std::chrono::steady_clock::now() < deadline) {
    const ssize_t n = ::send(fd.get(), text.data() + off, text.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<std::size_t>(n);
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return;
    } else {
      pollfd p{fd.get(), POLLOUT, 0};
      ::poll(&p, 1, 100);
    }
  }
}

inline void serve(const dispatch::Connection& c, std::uint32_t index) {
  write_all(c.socket, reply_line(c, index, read_request(c)));
}

}  // namespace sockshare::test
