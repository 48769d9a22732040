// Baseline for bench/serve_bench.sh: a plain 2-process HTTP server, one SO_REUSEPORT listener
// per process, the kernel spreading connections between them. It answers exactly what
// `sockshare serve`'s built-in worker answers (same headers, "worker I pid P\n" body, same
// /burn?ms=N and X-Burn-Ms handling), with the same accept -> epoll -> read -> write -> close
// path, so the benchmark measures how connections reach workers and nothing else. With
// --defer-accept (TCP_DEFER_ACCEPT, as `sockshare serve` sets by default with its built-in
// worker) an accepted connection has its request already, and is read at once, as the
// built-in worker does then: accept -> read -> write -> close. With --shared every process
// polls one shared listener instead, registered EPOLLEXCLUSIVE (so an arrival wakes one of
// them): the kernel mechanism `serve --mode inherit` uses, with nothing of sockshare's around it.
//
//   baseline_reuseport [--listen 127.0.0.1:0] [--workers 2] [--defer-accept SECONDS] [--shared]
// prints "listening 127.0.0.1:PORT" on stdout once every worker listens; SIGTERM stops all.
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
  std::fprintf(stderr, "baseline_reuseport: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

int open_listener(const char* host, int port, int defer_accept) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) die("SO_REUSEPORT");
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::inet_pton(AF_INET, host, &sin.sin_addr) != 1) die("inet_pton");
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof sin) != 0) die("bind");
  if (::listen(fd, 1024) != 0) die("listen");
  if (defer_accept > 0 &&
      ::setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer_accept, sizeof defer_accept) != 0)
    die("TCP_DEFER_ACCEPT");
  return fd;
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

void run_worker(int listener, int index, bool deferred, bool shared) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  ::signal(SIGPIPE, SIG_IGN);
  const std::string body =
      "worker " + std::to_string(index) + " pid " + std::to_string(::getpid()) + "\n";
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = shared ? EPOLLIN | EPOLLEXCLUSIVE : EPOLLIN;
  ev.data.fd = listener;
  if (::epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev) != 0) die("epoll_ctl");
  std::vector<Conn> conns(1024);
  std::vector<epoll_event> events(256);
  std::time_t date_second = 0;
  char date[64] = {};
  char buf[16384];
  // Reads and answers what has arrived; false once the connection is closed.
  auto serve = [&](int fd) {
    Conn& conn = conns[static_cast<std::size_t>(fd)];
    ssize_t got = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got <= 0) {
      if (got < 0 && errno == EAGAIN) return true;
      ::close(fd);
      return false;
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
      if (now != date_second) {
        date_second = now;
        std::tm tm{};
        ::gmtime_r(&now, &tm);
        std::strftime(date, sizeof date, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
      }
      out += "HTTP/1.1 200 OK\r\nServer: sockshare\r\n";
      out += date;
      out += "Content-Type: text/plain\r\nContent-Length: " + std::to_string(body.size());
      out += close_after ? "\r\nConnection: close\r\n\r\n" : "\r\n\r\n";
      out += body;
      conn.in.erase(0, end + 4);
      if (close_after) break;
    }
    if (!out.empty() && ::send(fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
      close_after = true;
    if (close_after) {
      ::close(fd);
      return false;
    }
    return true;
  };
  for (;;) {
    int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (int i = 0; i < n; ++i) {
      const int fd = events[static_cast<std::size_t>(i)].data.fd;
      if (fd != listener) {
        serve(fd);
        continue;
      }
      for (int k = 0; k < 64; ++k) {
        int c = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) break;
        if (static_cast<std::size_t>(c) >= conns.size())
          conns.resize(static_cast<std::size_t>(c) + 1024);
        conns[static_cast<std::size_t>(c)].in.clear();
        if (deferred && !serve(c)) continue;
        epoll_event cev{};
        cev.events = EPOLLIN;
        cev.data.fd = c;
        ::epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen = "127.0.0.1:0";
  int workers = 2;
  int defer_accept = 0;
  bool shared = false;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--shared") == 0)
      shared = true;
    else if (has_value && std::strcmp(argv[i], "--listen") == 0)
      listen = argv[++i];
    else if (has_value && std::strcmp(argv[i], "--workers") == 0)
      workers = std::atoi(argv[++i]);
    else if (has_value && std::strcmp(argv[i], "--defer-accept") == 0)
      defer_accept = std::atoi(argv[++i]);
  }
  auto colon = listen.rfind(':');
  std::string host = listen.substr(0, colon);
  int port = std::atoi(listen.c_str() + colon + 1);
  // The first listener resolves port 0; each further worker opens its own on that port, or
  // with --shared polls the first.
  int first = open_listener(host.c_str(), port, defer_accept);
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  ::getsockname(first, reinterpret_cast<sockaddr*>(&bound), &len);
  port = ntohs(bound.sin_port);
  std::vector<pid_t> children;
  for (int w = 0; w < workers; ++w) {
    int listener =
        w == 0 || shared ? first : open_listener(host.c_str(), port, defer_accept);
    pid_t pid = ::fork();
    if (pid < 0) die("fork");
    if (pid == 0) run_worker(listener, w, defer_accept > 0, shared);
    children.push_back(pid);
    if (!shared) ::close(listener);
  }
  if (shared) ::close(first);
  std::printf("listening %s:%d\n", host.c_str(), port);
  std::fflush(stdout);
  // The workers die with us (PR_SET_PDEATHSIG); wait until one of them or we are stopped.
  int status = 0;
  while (::wait(&status) < 0 && errno == EINTR) {
  }
  return 0;
}
