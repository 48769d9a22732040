// One process accepts TCP connections, another serves them: a sockshare Channel driven from
// standalone Asio on both sides.
//
//   asio_channel [--port N]        serve on 127.0.0.1:N (default: a free port) until SIGINT
//   asio_channel --self-test N     connect N clients to itself, check every reply, exit 0
//
// The parent (the acceptor) hands each accepted socket to a forked worker over a channel,
// with the client's address as per-descriptor metadata. The worker waits for the channel
// with asio::posix::stream_descriptor::async_wait(wait_read), drains it with try_receive,
// adopts each descriptor into an asio::ip::tcp::socket and answers one HTTP request. When
// the parent closes the channel the worker finishes its connections and exits.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <asio.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "sockshare/channel.hpp"

namespace {

using asio::ip::tcp;
using namespace sockshare;

constexpr std::uint16_t kConnection = 1;  // message type: one accepted TCP connection
constexpr auto kSelfTestDeadline = std::chrono::seconds(20);

std::span<const std::byte> bytes_of(std::string_view text) {
  return std::as_bytes(std::span<const char>(text.data(), text.size()));
}

// Asio closes what a stream_descriptor holds, and so does Channel: watch a duplicate so
// each descriptor has exactly one owner. Both refer to the same socket, so readiness is
// the channel's readiness.
asio::posix::stream_descriptor watch(asio::io_context& io, const Channel& channel) {
  Fd copy(::fcntl(channel.native_handle().get(), F_DUPFD_CLOEXEC, 0));
  if (!copy.valid()) throw Error::from_errno("fcntl(F_DUPFD_CLOEXEC) of the channel", errno);
  asio::posix::stream_descriptor descriptor(io);
  descriptor.assign(copy.get());
  (void)copy.release();  // now the descriptor's
  return descriptor;
}

// ---- the worker: serves the connections it is handed -------------------------------

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, std::string client)
      : socket_(std::move(socket)), client_(std::move(client)) {}

  void start() {
    auto self = shared_from_this();
    asio::async_read_until(socket_, asio::dynamic_buffer(request_), "\r\n\r\n",
                           [self](asio::error_code ec, std::size_t) {
                             if (!ec) self->reply();
                           });
  }

 private:
  void reply() {
    const std::string body = "served by worker pid=" + std::to_string(::getpid()) +
                             " for client=" + client_ +
                             " accepted by pid=" + std::to_string(::getppid()) + "\n";
    response_ = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " +
                std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    auto self = shared_from_this();
    asio::async_write(socket_, asio::buffer(response_), [self](asio::error_code, std::size_t) {
      asio::error_code ignored;
      self->socket_.shutdown(tcp::socket::shutdown_both, ignored);
    });
  }

  tcp::socket socket_;
  std::string client_;
  std::string request_;
  std::string response_;
};

class Worker {
 public:
  Worker(asio::io_context& io, Channel channel)
      : io_(io), channel_(std::move(channel)), readable_(watch(io, channel_)) {}

  void start() {
    readable_.async_wait(asio::posix::stream_descriptor::wait_read, [this](asio::error_code ec) {
      if (!ec) drain();
    });
  }

 private:
  // One completed wait may stand for many messages: take all that are waiting, then wait
  // again (try_receive returns false once the socket is empty).
  void drain() {
    try {
      while (channel_.try_receive(message_, options_)) adopt();
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::peer_gone) {  // the acceptor is done: stop listening to it
        readable_.close();
        return;
      }
      if (e.kind() != ErrorKind::protocol) throw;
      // The channel closed what came with the bad message and stays usable.
      std::fprintf(stderr, "asio_channel worker: refused a message: %s\n", e.what());
    }
    start();
  }

  void adopt() {
    if (message_.type != kConnection || message_.fds.size() != 1) {
      std::fprintf(stderr, "asio_channel worker: unexpected message type %u\n", message_.type);
      message_.fds.clear();
      return;
    }
    Fd fd = std::move(message_.fds[0]);
    const std::string client(
        message_.fd_meta.empty()
            ? std::string_view("?")
            : std::string_view(reinterpret_cast<const char*>(message_.fd_meta[0].data()),
                               message_.fd_meta[0].size()));
    const auto protocol = identify(fd.borrow()).family == AF_INET6 ? tcp::v6() : tcp::v4();
    tcp::socket socket(io_);
    asio::error_code ec;
    socket.assign(protocol, fd.get(), ec);
    if (ec) {
      std::fprintf(stderr, "asio_channel worker: adopting %s: %s\n", client.c_str(),
                   ec.message().c_str());
      return;  // fd still owns the descriptor and closes it
    }
    (void)fd.release();  // the asio socket owns it now
    std::make_shared<Session>(std::move(socket), client)->start();
  }

  asio::io_context& io_;
  Channel channel_;
  asio::posix::stream_descriptor readable_;
  Message message_;
  // R15: only connected TCP sockets, one per message; anything else is closed and reported.
  ReceiveOptions options_{.expect = Expect::tcp_stream, .max_fds = 1};
};

int worker_main(Channel channel) {
  // The parent decides when to stop (it closes the channel); a Ctrl-C meant for the
  // server as a whole must not cut connections this process is still serving.
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_IGN);
  try {
    asio::io_context io;
    Worker worker(io, std::move(channel));
    worker.start();
    io.run();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asio_channel worker: %s\n", e.what());
    return 1;
  }
}

// ---- the acceptor: accepts and hands over ----------------------------------------

class Acceptor {
 public:
  Acceptor(asio::io_context& io, Channel channel, std::uint16_t port)
      : channel_(std::move(channel)), writable_(watch(io, channel_)), acceptor_(io) {
    // sockshare opens the listener close-on-exec (Asio's own would not be); Asio drives it.
    Fd listener = listen_on(parse_endpoint("127.0.0.1:" + std::to_string(port)));
    acceptor_.assign(tcp::v4(), listener.get());
    (void)listener.release();
  }

  [[nodiscard]] std::uint16_t port() const { return acceptor_.local_endpoint().port(); }

  void start() { wait_for_connection(); }

  // Stops accepting and closes the channel once everything queued has gone out; the
  // worker then sees end of stream after the last connection.
  void stop() {
    stopping_ = true;
    acceptor_.close();
    if (queue_.empty()) finish();
  }

 private:
  struct Pending {
    Fd socket;
    std::string client;
  };

  // accept4 rather than Asio's accept: the accepted socket must be close-on-exec from the
  // start, which Asio's accept does not do.
  void wait_for_connection() {
    acceptor_.async_wait(tcp::acceptor::wait_read, [this](asio::error_code ec) {
      if (ec || stopping_) return;
      sockaddr_storage peer{};
      socklen_t length = sizeof peer;
      Fd socket(::accept4(acceptor_.native_handle(), reinterpret_cast<sockaddr*>(&peer), &length,
                          SOCK_CLOEXEC));
      if (socket.valid()) {
        tcp::endpoint endpoint;
        endpoint.resize(length);
        std::memcpy(endpoint.data(), &peer, length);
        queue_.push_back({std::move(socket),
                          endpoint.address().to_string() + ":" + std::to_string(endpoint.port())});
        flush();
      } else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        std::fprintf(stderr, "asio_channel: accept4: %s\n", std::strerror(errno));
      }
      wait_for_connection();
    });
  }

  // Sends what is queued; when the channel is full, waits until it is writable again.
  void flush() {
    while (!queue_.empty()) {
      const Pending& next = queue_.front();
      const std::array<BorrowedFd, 1> fds = {next.socket.borrow()};
      const std::array<std::span<const std::byte>, 1> meta = {bytes_of(next.client)};
      if (!channel_.try_send(Outgoing{.type = kConnection, .fds = fds, .fd_meta = meta})) {
        if (!waiting_to_write_) {
          waiting_to_write_ = true;
          writable_.async_wait(asio::posix::stream_descriptor::wait_write,
                               [this](asio::error_code ec) {
                                 waiting_to_write_ = false;
                                 if (!ec) flush();
                               });
        }
        return;
      }
      queue_.pop_front();  // our copy closes: the worker holds the connection now
    }
    if (stopping_) finish();
  }

  void finish() {
    writable_.close();
    channel_.shutdown_send();
  }

  Channel channel_;
  asio::posix::stream_descriptor writable_;
  tcp::acceptor acceptor_;
  // Unbounded to keep the example short; a real server stops accepting while its workers are
  // behind and leaves new connections in the kernel's backlog (R10).
  std::deque<Pending> queue_;
  bool waiting_to_write_ = false;
  bool stopping_ = false;
};

// ---- the self-test client ---------------------------------------------------------

class Client : public std::enable_shared_from_this<Client> {
 public:
  Client(asio::io_context& io, std::uint16_t port, pid_t worker, std::function<void(bool)> done)
      : socket_(io), port_(port), worker_(worker), done_(std::move(done)) {}

  void start() {
    auto self = shared_from_this();
    socket_.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port_),
                          [self](asio::error_code ec) {
                            if (ec) return self->finish(false, "connect: " + ec.message());
                            self->send();
                          });
  }

 private:
  void send() {
    auto self = shared_from_this();
    request_ = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    asio::async_write(socket_, asio::buffer(request_), [self](asio::error_code ec, std::size_t) {
      if (ec) return self->finish(false, "write: " + ec.message());
      self->receive();
    });
  }

  void receive() {
    auto self = shared_from_this();
    asio::async_read(socket_, asio::dynamic_buffer(response_),
                     [self](asio::error_code ec, std::size_t) {
                       if (ec && ec != asio::error::eof)
                         return self->finish(false, "read: " + ec.message());
                       self->check();
                     });
  }

  void check() {
    const auto local = socket_.local_endpoint();
    const std::string me =
        "client=" + local.address().to_string() + ":" + std::to_string(local.port());
    const std::string worker = "served by worker pid=" + std::to_string(worker_);
    const bool ok = response_.starts_with("HTTP/1.1 200 OK\r\n") &&
                    response_.find(worker) != std::string::npos &&
                    response_.find(me) != std::string::npos;
    finish(ok, ok ? "" : "unexpected reply: " + response_);
  }

  void finish(bool ok, const std::string& why) {
    if (!ok) std::fprintf(stderr, "asio_channel self-test: %s\n", why.c_str());
    done_(ok);
  }

  tcp::socket socket_;
  std::uint16_t port_;
  pid_t worker_;
  std::function<void(bool)> done_;
  std::string request_;
  std::string response_;
};

// Waits for the worker to exit; kills it if it has not within the deadline.
int reap(pid_t pid, std::chrono::seconds deadline) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0 && errno != EINTR) return 1;
    if (std::chrono::steady_clock::now() >= until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      std::fprintf(stderr, "asio_channel: worker did not exit; killed it\n");
      return 1;
    }
    ::usleep(10'000);
  }
}

int acceptor_main(Channel channel, pid_t worker, std::uint16_t port, int self_test) {
  asio::io_context io;
  Acceptor acceptor(io, std::move(channel), port);
  acceptor.start();
  std::printf("listening 127.0.0.1:%u, worker pid %d\n", acceptor.port(), static_cast<int>(worker));
  std::fflush(stdout);

  int passed = 0;
  int finished = 0;
  asio::steady_timer deadline(io);
  asio::signal_set signals(io, SIGINT, SIGTERM);
  if (self_test > 0) {
    deadline.expires_after(kSelfTestDeadline);
    deadline.async_wait([&](asio::error_code ec) {
      if (ec) return;
      std::fprintf(stderr, "asio_channel self-test: %d of %d clients done after %llds\n", finished,
                   self_test, static_cast<long long>(kSelfTestDeadline.count()));
      io.stop();
    });
    for (int i = 0; i < self_test; ++i) {
      std::make_shared<Client>(io, acceptor.port(), worker, [&](bool ok) {
        passed += ok ? 1 : 0;
        if (++finished == self_test) {
          deadline.cancel();
          acceptor.stop();
        }
      })->start();
    }
  } else {
    signals.async_wait([&](asio::error_code ec, int) {
      if (!ec) acceptor.stop();
    });
  }
  io.run();
  signals.cancel();

  const bool completed = finished == self_test;
  const int worker_status = reap(worker, std::chrono::seconds(completed ? 10 : 0));
  if (self_test == 0) return worker_status;
  std::printf("self-test: %d of %d clients served by worker pid %d; worker exit status %d\n",
              passed, self_test, static_cast<int>(worker), worker_status);
  return passed == self_test && worker_status == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t port = 0;
  int self_test = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--port" && i + 1 < argc) {
      port = static_cast<std::uint16_t>(std::atoi(argv[++i]));
    } else if (arg == "--self-test" && i + 1 < argc) {
      self_test = std::atoi(argv[++i]);
      if (self_test < 1 || self_test > 1000) {
        std::fprintf(stderr, "asio_channel: --self-test takes 1-1000 clients\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--port N] [--self-test CLIENTS]\n", argv[0]);
      return 2;
    }
  }
  try {
    auto [acceptor_end, worker_end] = Channel::pair();
    std::fflush(stdout);
    const pid_t worker = ::fork();
    if (worker < 0) throw Error::from_errno("fork", errno);
    if (worker == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the acceptor
      acceptor_end.release().reset();
      std::exit(worker_main(std::move(worker_end)));
    }
    worker_end.release().reset();  // only the worker holds its end, so it sees end of stream
    return acceptor_main(std::move(acceptor_end), worker, port, self_test);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asio_channel: %s\n", e.what());
    return 1;
  }
}
