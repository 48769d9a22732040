#include "control.hpp"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <span>

#include "linux/sys.hpp"
#include "log.hpp"
#include "sockshare/error.hpp"

namespace sockshare::cli::control {
namespace {

// Enough for an operator and a scraper or two; more are refused rather than letting
// connections to the control socket use up the supervisor's descriptors.
constexpr std::size_t kMaxClients = 16;

std::span<const std::byte> bytes(std::string_view text) {
  return {reinterpret_cast<const std::byte*>(text.data()), text.size()};
}

}  // namespace

Endpoint default_endpoint(pid_t pid, bool create_directory) {
  std::string dir;
  if (const char* runtime = std::getenv("XDG_RUNTIME_DIR"); runtime != nullptr && *runtime == '/') {
    dir = std::string(runtime) + "/sockshare";
  } else {
    dir = "/tmp/sockshare-" + std::to_string(::getuid());
  }
  if (create_directory) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) sys::throw_errno("mkdir(" + dir + ")");
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) sys::throw_errno("lstat(" + dir + ")");
    if (!S_ISDIR(st.st_mode) || st.st_uid != ::getuid() || (st.st_mode & 077) != 0) {
      throw Error(ErrorKind::refused, 0, "control directory " + dir,
                  "must be a directory owned by this user with mode 0700; use --control");
    }
  }
  Endpoint endpoint;
  endpoint.kind = Endpoint::Kind::unix_path;
  endpoint.path = dir + "/serve-" + std::to_string(pid) + ".sock";
  return endpoint;
}

void remove_stale_socket(const Endpoint& endpoint) {
  if (endpoint.kind != Endpoint::Kind::unix_path) return;
  struct stat st {};
  if (::lstat(endpoint.path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return;
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (endpoint.path.size() >= sizeof sun.sun_path) return;
  std::memcpy(sun.sun_path, endpoint.path.data(), endpoint.path.size());
  // Non-blocking: a live serve with a full backlog answers EAGAIN and keeps its file,
  // instead of hanging this one.
  Fd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!probe.valid()) return;
  const int rc = sys::retry_eintr(
      [&] { return ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&sun), sizeof sun); });
  if (rc != 0 && errno == ECONNREFUSED) {
    log::info("control-stale-removed", "path={}", log::value(endpoint.path));
    ::unlink(endpoint.path.c_str());
  }
}

struct Server::Client {
  Channel channel;
  Message message;
  std::uint64_t id = 0;  // a reload answers later: it finds its client by id, not by pointer
};

Server::Server(dispatch::Dispatcher& loop, ChannelListener listener, Render render, Reload reload)
    : loop_(loop),
      listener_(std::move(listener)),
      render_(std::move(render)),
      reload_(std::move(reload)) {
  loop_.watch(listener_.native_handle(), EPOLLIN, [this](std::uint32_t) { on_accept(); });
}

Server::~Server() {
  for (auto& client : clients_) loop_.unwatch(client->channel.native_handle());
  loop_.unwatch(listener_.native_handle());
}

void Server::on_accept() {
  for (;;) {
    std::optional<Channel> channel;
    try {
      channel = listener_.try_accept();
    } catch (const Error& e) {
      log::warn("control-accept-failed", "error={}", log::value(e.what()));
      return;
    }
    if (!channel) return;
    const PeerCredentials peer = channel->peer_credentials();
    if (peer.uid != ::getuid() && peer.uid != 0) {
      log::warn("control-refused", "peer_pid={} peer_uid={} reason=\"another user\"", peer.pid,
                peer.uid);
      continue;
    }
    if (clients_.size() >= kMaxClients) {
      log::warn("control-refused", "peer_pid={} reason=\"too many control clients\"", peer.pid);
      continue;
    }
    // Nothing on this socket carries descriptors (R16).
    channel->refuse_descriptors();
    auto client = std::make_unique<Client>();
    client->channel = std::move(*channel);
    client->id = next_client_id_++;
    Client* raw = client.get();
    clients_.push_back(std::move(client));
    loop_.watch(raw->channel.native_handle(), EPOLLIN,
                [this, raw](std::uint32_t) { on_client(raw); });
  }
}

void Server::on_client(Client* client) {
  ReceiveOptions options;
  options.max_fds = 0;
  try {
    while (client->channel.try_receive(client->message, options)) {
      if (client->message.type == kReloadRequest && reload_) {
        const std::uint64_t id = client->id;
        reload_([this, id](bool ok, std::string text) {
          auto it = std::find_if(clients_.begin(), clients_.end(),
                                 [id](const std::unique_ptr<Client>& c) { return c->id == id; });
          if (it == clients_.end()) return;  // the client left before the outcome
          Client* waiting = it->get();
          try {
            waiting->channel.send({.type = ok ? kReloadResponse : kError, .payload = bytes(text)},
                                  std::chrono::seconds(1));
          } catch (const Error&) {
            drop(waiting);
          }
        });
        continue;
      }
      if (client->message.type != kStatusRequest) {
        const std::string why = "unknown request type " + std::to_string(client->message.type);
        client->channel.send({.type = kError, .payload = bytes(why)}, std::chrono::seconds(1));
        continue;
      }
      const std::string_view format = client->message.payload_text();
      if (format != "text" && format != "prometheus") {
        const std::string why = "unknown format \"" + std::string(format) + "\"";
        client->channel.send({.type = kError, .payload = bytes(why)}, std::chrono::seconds(1));
        continue;
      }
      const std::string report = render_(format);
      // A report never approaches the channel's message limit; truncating keeps the answer
      // well-formed if a huge worker count ever made it do so.
      const std::string_view payload =
          std::string_view(report).substr(0, std::min(report.size(), wire::kMaxPayload - 64));
      // Bounded: a client that stops reading must not stall the event loop for long.
      client->channel.send({.type = kStatusResponse, .payload = bytes(payload)},
                           std::chrono::seconds(1));
    }
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::peer_gone) {
      log::warn("control-client-dropped", "error={}", log::value(e.what()));
    }
    drop(client);
  }
}

void Server::drop(Client* client) {
  loop_.unwatch(client->channel.native_handle());
  std::erase_if(clients_, [client](const std::unique_ptr<Client>& c) { return c.get() == client; });
}

std::string request_reload(const Endpoint& endpoint, std::chrono::milliseconds timeout) {
  Channel channel = Channel::connect(endpoint, timeout);
  channel.send({.type = kReloadRequest}, timeout);
  ReceiveOptions options;
  options.max_fds = 0;
  Message reply = channel.receive(options, timeout);
  if (reply.type == kError) {
    throw Error(ErrorKind::refused, 0, "reload of " + endpoint.to_string(), reply.payload_text());
  }
  if (reply.type != kReloadResponse) {
    throw Error(ErrorKind::protocol, 0, "reload of " + endpoint.to_string(),
                "unexpected reply type " + std::to_string(reply.type));
  }
  return std::string(reply.payload_text());
}

std::string request_status(const Endpoint& endpoint, bool prometheus,
                           std::chrono::milliseconds timeout) {
  Channel channel = Channel::connect(endpoint, timeout);
  const std::string_view format = prometheus ? "prometheus" : "text";
  channel.send({.type = kStatusRequest, .payload = bytes(format)}, timeout);
  ReceiveOptions options;
  options.max_fds = 0;
  Message reply = channel.receive(options, timeout);
  if (reply.type == kError) {
    throw Error(ErrorKind::protocol, 0, "status request to " + endpoint.to_string(),
                reply.payload_text());
  }
  if (reply.type != kStatusResponse) {
    throw Error(ErrorKind::protocol, 0, "status request to " + endpoint.to_string(),
                "unexpected reply type " + std::to_string(reply.type));
  }
  return std::string(reply.payload_text());
}

}  // namespace sockshare::cli::control
