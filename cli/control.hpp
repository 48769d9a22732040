// The control socket of `sockshare serve`: a ChannelListener speaking typed messages in the
// 0x83xx range (docs/SERVE.md). One request, one response; a client may send several
// requests on one connection.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sockshare/channel.hpp"
#include "sockshare/dispatch.hpp"
#include "sockshare/socket.hpp"

namespace sockshare::cli::control {

inline constexpr std::uint16_t kStatusRequest = 0x8301;   // payload: "text" or "prometheus"
inline constexpr std::uint16_t kStatusResponse = 0x8302;  // payload: the rendered report
inline constexpr std::uint16_t kReloadRequest = 0x8303;   // payload: empty
// Sent once the new generation is ready (or failed): "generation K ready" / the reason.
inline constexpr std::uint16_t kReloadResponse = 0x8304;
inline constexpr std::uint16_t kError = 0x83ff;  // payload: what was wrong

// The default control endpoint of the serve process `pid`: a socket in a directory only this
// user can enter ($XDG_RUNTIME_DIR/sockshare, else /tmp/sockshare-<uid>). An abstract name
// would let any local user connect or squat it (R18). `create_directory` makes the directory
// (mode 0700) and refuses one that another user owns or others can enter.
[[nodiscard]] Endpoint default_endpoint(pid_t pid, bool create_directory);

// A serve process killed outright (SIGKILL) leaves its socket file behind, and pids are
// reused: a later serve with the same pid would fail to bind. A socket file nobody accepts on
// is stale and is removed; one that answers belongs to a live server and is left alone (bind
// then reports EADDRINUSE).
void remove_stale_socket(const Endpoint& endpoint);

// Serves status requests on `listener`, inside the dispatcher's event loop.
class Server {
 public:
  // Renders the report for a format ("text" or "prometheus").
  using Render = std::function<std::string(std::string_view format)>;

  // Starts a reload and calls `done` once it succeeded or failed (possibly much later, from
  // the loop; never after the Server is gone if the caller answers pending reloads first).
  using Done = std::function<void(bool ok, std::string text)>;
  using Reload = std::function<void(Done done)>;

  Server(dispatch::Dispatcher& loop, ChannelListener listener, Render render, Reload reload = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  [[nodiscard]] const Endpoint& endpoint() const noexcept { return listener_.endpoint(); }

 private:
  struct Client;
  void on_accept();
  void on_client(Client* client);
  void drop(Client* client);

  dispatch::Dispatcher& loop_;
  ChannelListener listener_;
  Render render_;
  Reload reload_;
  std::vector<std::unique_ptr<Client>> clients_;
  std::uint64_t next_client_id_ = 1;
};

// One reload request: connects, asks, waits up to `timeout` for the outcome. Returns the
// server's text on success; throws Error (kind refused with the reason) on failure.
[[nodiscard]] std::string request_reload(const Endpoint& endpoint,
                                         std::chrono::milliseconds timeout);

// One status request: connects, asks, returns the report. Throws Error.
[[nodiscard]] std::string request_status(const Endpoint& endpoint, bool prometheus,
                                         std::chrono::milliseconds timeout);

}  // namespace sockshare::cli::control
