// Baseline for bench/serve_bench.sh: the naive dispatcher. One process accepts and sends each
// connection with sendmsg(SCM_RIGHTS) to the next of N worker processes, round-robin, then
// closes its copy: no acknowledgement, no policy, no counters, no recovery. The workers
// answer exactly what `sockshare serve`'s built-in worker answers, reading the request as
// soon as a connection arrives, as the built-in worker does in dispatch mode. The distance
// between this and `sockshare serve --mode dispatch` is what sockshare's guarantees cost.
//
//   baseline_naive_dispatch [--listen 127.0.0.1:0] [--workers 2] [--defer-accept SECONDS]
// (--defer-accept sets TCP_DEFER_ACCEPT on the listener, as `sockshare serve` does by default
// with its built-in worker, so the two can be compared with and without it.)
// prints "listening 127.0.0.1:PORT" and "dispatcher PID" on stdout; SIGTERM stops all.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>
#include <vector>

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "baseline_naive_dispatch: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

char lower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c;
}

bool contains_ci(std::string_view haystack, std::string_view needle) {
  if (needle.size() > haystack.size()) return false;
  for (std::size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
    std::size_t j = 0;
    while (j < needle.size() && lower(haystack[i + j]) == needle[j]) ++j;
    if (j == needle.size()) return true;
  }
  return false;
}

unsigned burn_ms(std::string_view head) {
  auto line_end = head.find("\r\n");
  std::string_view request_line = head.substr(0, line_end);
  if (auto p = request_line.find("/burn?ms="); p != std::string_view::npos) {
    return static_cast<unsigned>(std::strtoul(request_line.data() + p + 9, nullptr, 10));
  }
  if (auto p = head.find("X-Burn-Ms:"); p != std::string_view::npos) {
    return static_cast<unsigned>(std::strtoul(head.data() + p + 10, nullptr, 10));
  }
  return 0;
}

void burn(unsigned ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  volatile std::uint64_t sink = 0;
  while (std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 1000; ++i) sink = sink + static_cast<std::uint64_t>(i);
  }
}

struct Conn {
  std::string in;
};

class WorkerLoop {
 public:
  WorkerLoop(int channel, int index) : channel_(channel) {
    body_ = "worker " + std::to_string(index) + " pid " + std::to_string(::getpid()) + "\n";
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = channel;
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, channel, &ev) != 0) die("epoll_ctl");
  }

  [[noreturn]] void run() {
    std::vector<epoll_event> events(256);
    for (;;) {
      int n = ::epoll_wait(ep_, events.data(), static_cast<int>(events.size()), -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        die("epoll_wait");
      }
      for (int i = 0; i < n; ++i) {
        const int fd = events[static_cast<std::size_t>(i)].data.fd;
        if (fd == channel_) {
          receive();
        } else {
          serve(fd, true);
        }
      }
    }
  }

 private:
  void receive() {
    for (;;) {
      char byte;
      iovec iov{&byte, 1};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      ssize_t n = ::recvmsg(channel_, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n < 0 && errno == EAGAIN) return;
      if (n <= 0) std::exit(0);  // the dispatcher is gone
      cmsghdr* cm = CMSG_FIRSTHDR(&msg);
      if (cm == nullptr || cm->cmsg_type != SCM_RIGHTS) continue;
      int fd;
      std::memcpy(&fd, CMSG_DATA(cm), sizeof fd);
      if (static_cast<std::size_t>(fd) >= conns_.size())
        conns_.resize(static_cast<std::size_t>(fd) + 1024);
      conns_[static_cast<std::size_t>(fd)].in.clear();
      serve(fd, false);
    }
  }

  // `registered`: the descriptor is in the epoll set already.
  void serve(int fd, bool registered) {
    Conn& conn = conns_[static_cast<std::size_t>(fd)];
    char buf[16384];
    ssize_t got = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got < 0 && errno == EAGAIN) {
      if (!registered) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        ::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
      }
      return;
    }
    if (got <= 0) {
      finish(fd, registered);
      return;
    }
    conn.in.append(buf, static_cast<std::size_t>(got));
    bool close_after = false;
    std::string out;
    for (;;) {
      auto end = conn.in.find("\r\n\r\n");
      if (end == std::string::npos) break;
      std::string_view head(conn.in.data(), end + 2);
      if (unsigned ms = burn_ms(head)) burn(ms);
      close_after = contains_ci(head, "connection: close");
      const std::time_t now = std::time(nullptr);
      if (now != date_second_) {
        date_second_ = now;
        std::tm tm{};
        ::gmtime_r(&now, &tm);
        std::strftime(date_, sizeof date_, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
      }
      out += "HTTP/1.1 200 OK\r\nServer: sockshare\r\n";
      out += date_;
      out += "Content-Type: text/plain\r\nContent-Length: " + std::to_string(body_.size());
      out += close_after ? "\r\nConnection: close\r\n\r\n" : "\r\n\r\n";
      out += body_;
      conn.in.erase(0, end + 4);
      if (close_after) break;
    }
    if (!out.empty() && ::send(fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
      close_after = true;
    if (close_after) {
      finish(fd, registered);
    } else if (!registered) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      ::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
    }
  }

  void finish(int fd, bool registered) {
    // The dispatcher may still hold its copy: the registration would outlive close().
    if (registered) ::epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
  }

  int channel_;
  int ep_;
  std::string body_;
  std::vector<Conn> conns_ = std::vector<Conn>(1024);
  std::time_t date_second_ = 0;
  char date_[64] = {};
};

}  // namespace

int main(int argc, char** argv) {
  std::string listen = "127.0.0.1:0";
  int workers = 2;
  int defer_accept = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--listen") == 0)
      listen = argv[i + 1];
    else if (std::strcmp(argv[i], "--workers") == 0)
      workers = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--defer-accept") == 0)
      defer_accept = std::atoi(argv[i + 1]);
  }
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<int> channels;
  for (int w = 0; w < workers; ++w) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    pid_t pid = ::fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::close(sv[0]);
      for (int c : channels) ::close(c);
      WorkerLoop(sv[1], w).run();
    }
    ::close(sv[1]);
    channels.push_back(sv[0]);
  }

  auto colon = listen.rfind(':');
  std::string host = listen.substr(0, colon);
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(static_cast<std::uint16_t>(std::atoi(listen.c_str() + colon + 1)));
  if (::inet_pton(AF_INET, host.c_str(), &sin.sin_addr) != 1) die("inet_pton");
  if (::bind(listener, reinterpret_cast<sockaddr*>(&sin), sizeof sin) != 0) die("bind");
  if (::listen(listener, 1024) != 0) die("listen");
  if (defer_accept > 0 &&
      ::setsockopt(listener, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer_accept, sizeof defer_accept) != 0)
    die("TCP_DEFER_ACCEPT");
  socklen_t len = sizeof sin;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&sin), &len);
  std::printf("listening %s:%d\ndispatcher %d\n", host.c_str(), ntohs(sin.sin_port), ::getpid());
  std::fflush(stdout);

  std::size_t next = 0;
  for (;;) {
    int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      die("accept4");
    }
    char byte = 0;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    if (::sendmsg(channels[next], &msg, MSG_NOSIGNAL) < 0) die("sendmsg");
    next = (next + 1) % channels.size();
    ::close(fd);
  }
}
