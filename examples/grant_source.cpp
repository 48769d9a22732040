// Watch a socket change process, part 1: accepts one TCP connection and grants it to
// another process.
//
//   grant_source <target-pid>          prints the info line; paste it into grant_target
//   grant_source --spawn <program>     starts <program> (e.g. ./grant_target) as a child
//                                      and hands it the connection via SOCKSHARE_INFO
//
// Then connect a client: nc 127.0.0.1 <port>. The connection moves: once the target
// acknowledges, this process closes its copy and the target talks to the client.
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "sockshare/error.hpp"
#include "sockshare/grant.hpp"
#include "sockshare/socket.hpp"
#include "sockshare/spawn.hpp"

int main(int argc, char** argv) {
  using namespace sockshare;
  if (argc != 2 && !(argc == 3 && std::strcmp(argv[1], "--spawn") == 0)) {
    std::fprintf(stderr, "usage: %s <target-pid> | --spawn <program>\n", argv[0]);
    return 2;
  }
  try {
    std::mutex mutex;
    std::condition_variable done;
    bool finished = false;
    GrantServer server({.on_event = [&](GrantEvent& event) {
      std::printf("source: grant %s%s%s\n", std::string(to_string(event.outcome)).c_str(),
                  event.detail.empty() ? "" : ": ", event.detail.c_str());
      std::lock_guard lock(mutex);
      finished = true;
      done.notify_all();
    }});

    Fd listener = listen_on(parse_endpoint("127.0.0.1:0"), {.backlog = 1, .nonblocking = false});
    std::printf("source pid %d: waiting for a client; run: nc 127.0.0.1 %u\n", ::getpid(),
                local_endpoint(listener.borrow()).port);
    std::fflush(stdout);
    Fd connection(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection.valid()) {
      std::perror("accept4");
      return 1;
    }
    const std::string hello = "hello from the source, pid " + std::to_string(::getpid()) + "\n";
    (void)!::send(connection.get(), hello.data(), hello.size(), MSG_NOSIGNAL);

    const GrantOptions ttl{.ttl = std::chrono::minutes(5)};  // time to paste by hand
    pid_t child = -1;
    if (argc == 3) {
      // The child gets the grant race-free: it is created for the child's pidfd.
      SpawnedChild spawned = spawn_with_socket(
          server, connection.borrow(),
          {.argv = {argv[2]}, .env = {}, .passing = InfoPassing::environment, .grant = ttl});
      child = spawned.pid;
      connection.reset();  // the grant keeps its own copy until the child acknowledges
      std::printf("source: started %s as pid %d with %s\n", argv[2], child,
                  spawned.info.describe().c_str());
    } else {
      const SocketInfo info = server.move(std::move(connection),
                                          Target::pid(static_cast<pid_t>(std::stol(argv[1]))), ttl);
      std::printf("source: %s\nsource: paste this line into grant_target:\n%s\n",
                  info.describe().c_str(), info.format().c_str());
    }
    std::fflush(stdout);
    {
      std::unique_lock lock(mutex);
      done.wait(lock, [&] { return finished; });
    }
    std::printf("source: my copy is closed; the connection now lives in the target only\n");
    if (child > 0) ::waitpid(child, nullptr, 0);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "grant_source: %s\n", e.what());
    return 1;
  }
}
