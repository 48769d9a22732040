// A server that upgrades without dropping a connection. Run it; run the same command again
// (a new build, a new configuration): the second process takes the listening socket from
// the first, which stops accepting, answers what it already accepted and exits.
//
//   handoff_server [--listen 127.0.0.1:8080] [--control unix:@handoff-demo]
//
// Under systemd (socket activation, Type=notify) the first generation gets its listener
// from LISTEN_FDS instead of opening it, and readiness goes back over NOTIFY_SOCKET:
//
//   # handoff-demo.socket                # handoff-demo.service
//   [Socket]                             [Service]
//   ListenStream=127.0.0.1:8080          Type=notify
//   FileDescriptorName=web               ExecStart=/usr/local/bin/handoff_server
//                                        NotifyAccess=all
//
// Every connection gets one line, "served by pid N", and is closed.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "sockshare/handoff.hpp"
#include "sockshare/systemd.hpp"

using namespace sockshare;

namespace {

void answer_all(int listener) {
  const std::string reply = "served by pid " + std::to_string(::getpid()) + "\n";
  for (;;) {
    Fd conn(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) return;  // the queue is empty: the listener is non-blocking
    set_nonblocking(conn.borrow(), false);
    (void)::send(conn.get(), reply.data(), reply.size(), MSG_NOSIGNAL);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen_text = "127.0.0.1:8080";
  std::string control_text = "unix:@handoff-demo";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--listen") == 0) listen_text = argv[i + 1];
    if (std::strcmp(argv[i], "--control") == 0) control_text = argv[i + 1];
  }
  const Endpoint control = parse_endpoint(control_text);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a log line per event, even into a file

  try {
    // 1. Listeners: from systemd, from a running generation, or opened here.
    Fd listener;
    Fd inherited_control;
    auto activation = systemd::listen_fds_from_environment();
    if (activation.status == systemd::ListenStatus::activated && !activation.sockets.empty()) {
      auto* web = activation.find("web");
      listener = std::move(web != nullptr ? web->fd : activation.sockets[0].fd);
      std::printf("pid %d: listener from systemd\n", ::getpid());
    } else {
      if (!activation.diagnostic.empty()) std::fprintf(stderr, "warning: %s\n", activation.diagnostic.c_str());
      try {
        handoff::TakeOptions options;
        options.timeout = std::chrono::seconds(5);
        auto takeover = handoff::take_listeners(control, options);
        for (auto& l : takeover.listeners) {
          if (l.meta.name == "web") listener = std::move(l.fd);
        }
        inherited_control = std::move(takeover.control);
        std::printf("pid %d: took over from pid %d\n", ::getpid(), takeover.holder_pid);
      } catch (const Error& e) {
        // Nobody to take over from (ENOENT, ECONNREFUSED): the first generation.
        if (e.code() != ENOENT && e.code() != ECONNREFUSED) throw;
      }
      if (!listener.valid()) {
        listener = listen_on(parse_endpoint(listen_text));
        std::printf("pid %d: listening on %s\n", ::getpid(), local_endpoint(listener.borrow()).to_string().c_str());
      }
    }
    set_nonblocking(listener.borrow(), true);

    // 2. Be ready to hand over to the next generation.
    bool handed_over = false;
    handoff::HandoffServerOptions options;
    options.on_handed_over = [&] { handed_over = true; };
    handoff::HandoffServer server = inherited_control.valid()
                                        ? handoff::HandoffServer::adopt(std::move(inherited_control), options)
                                        : handoff::HandoffServer::listen(control, options);
    server.add("web", listener.borrow());
    systemd::notify_ready("serving; upgrades via " + server.endpoint().to_string());
    // A new main process must tell systemd it is the main process now.
    systemd::notify_main_pid(::getpid());

    // 3. Serve until a successor has taken over.
    while (!handed_over) {
      pollfd fds[2] = {{listener.get(), POLLIN, 0}, {server.native_handle().get(), POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) continue;
      if (fds[0].revents != 0) answer_all(listener.get());
      if (fds[1].revents != 0) {
        auto outcome = server.serve(std::chrono::milliseconds(0));
        if (outcome.result == handoff::ServeResult::failed ||
            outcome.result == handoff::ServeResult::refused) {
          std::fprintf(stderr, "pid %d: handoff %s, still serving: %s\n", ::getpid(),
                       std::string(handoff::to_string(outcome.result)).c_str(), outcome.detail.c_str());
        }
      }
    }
    // Everything accepted was answered at once, so there is nothing left to drain here; a
    // server with long connections would finish them now.
    std::printf("pid %d: handed over, exiting\n", ::getpid());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "handoff_server: %s\n", e.what());
    return 1;
  }
}
