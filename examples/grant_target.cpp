// Watch a socket change process, part 2: redeems a connection granted by grant_source and
// talks to the client through it (echoing each line in upper case).
//
//   grant_target          prints its pid, then reads the info line from standard input
//                         (or takes it from SOCKSHARE_INFO when grant_source --spawn ran it)
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "sockshare/error.hpp"
#include "sockshare/grant.hpp"

int main() {
  using namespace sockshare;
  try {
    SocketInfo info;
    if (std::getenv("SOCKSHARE_INFO") != nullptr) {
      info = inherited_info();
    } else {
      std::printf("target pid %d: run grant_source %d, then paste its sockshare1: line here\n",
                  ::getpid(), ::getpid());
      std::fflush(stdout);
      std::string line;
      if (!std::getline(std::cin, line)) return 1;
      info = SocketInfo::parse(line);
    }
    std::printf("target: redeeming %s\n", info.describe().c_str());
    Fd socket = redeem(info);
    std::printf("target: got the connection as fd %d\n", socket.get());
    std::fflush(stdout);
    const std::string hello = "hello from the target, pid " + std::to_string(::getpid()) +
                              "; type a line and I will shout it back\n";
    (void)!::send(socket.get(), hello.data(), hello.size(), MSG_NOSIGNAL);
    char buffer[1024];
    for (;;) {
      const ssize_t n = ::recv(socket.get(), buffer, sizeof buffer, 0);
      if (n <= 0) break;
      for (ssize_t i = 0; i < n; ++i) {
        buffer[i] = static_cast<char>(std::toupper(static_cast<unsigned char>(buffer[i])));
      }
      (void)!::send(socket.get(), buffer, static_cast<std::size_t>(n), MSG_NOSIGNAL);
    }
    std::printf("target: the client closed the connection\n");
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "grant_target: %s\n", e.what());
    return 1;
  }
}
