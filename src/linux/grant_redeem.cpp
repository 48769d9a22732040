// The target side of duplicate/redeem: WSASocket(FROM_PROTOCOL_INFO) on Linux.
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "linux/pidfd.hpp"
#include "linux/sys.hpp"
#include "sockshare/channel.hpp"
#include "sockshare/grant.hpp"

namespace sockshare {
namespace {

namespace gp = grant_protocol;
using Clock = std::chrono::steady_clock;

std::uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000U +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

std::chrono::milliseconds left(Clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return ms.count() < 0 ? std::chrono::milliseconds(0) : ms;
}

std::uint64_t get_le(const std::byte* in, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t{std::to_integer<std::uint8_t>(in[i])} << (8 * i);
  return v;
}

void put_le(std::byte* out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = std::byte{static_cast<std::uint8_t>(v >> (8 * i))};
}

std::span<const std::byte> text_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// R15/R20: the descriptor must be the very socket the info describes. The cookie is unique
// for the boot, so a reused descriptor number or a swapped socket cannot pass.
std::optional<std::string> wrong_socket(BorrowedFd fd, const SocketInfo& info) {
  const SocketIdentity id = identify(fd);
  if (!id.is_socket) return "not a socket";
  if (id.family != info.family || id.type != info.type || id.protocol != info.protocol) {
    return "got " + id.describe() + ", the info describes another kind of socket";
  }
  if (info.cookie != 0 && id.cookie != info.cookie) return "socket cookie differs from the grant's";
  return std::nullopt;
}

bool same_process(const pidfd::Identity& who, std::uint64_t inode, std::int32_t pid,
                  std::uint32_t uid) {
  if (inode != 0 && who.inode != 0) return who.inode == inode;
  return who.pid == pid && who.uid == uid;
}

}  // namespace

Fd redeem(const SocketInfo& info, const RedeemOptions& options) {
  const std::string op = "redeem(" + info.describe() + ")";
  const auto deadline = Clock::now() + options.timeout;

  // The source refuses these too; checking first gives the target a precise message and
  // never shows the token to anyone when the grant cannot be ours.
  const pidfd::Identity me = pidfd::self();
  if (!same_process(me, info.target_inode, info.target_pid, info.target_uid)) {
    throw Error(ErrorKind::refused, 0, op,
                "this grant is bound to pid " + std::to_string(info.target_pid) +
                    ", not to this process (pid " + std::to_string(me.pid) + ") (S1/R17)");
  }
  if (info.expires_ns <= now_ns()) throw Error(ErrorKind::refused, 0, op, "the grant has expired");

  Channel channel;
  try {
    channel = Channel::connect(info.grant_endpoint(), left(deadline));
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::timed_out) throw;
    bool source_alive = false;
    try {
      if (auto source = pidfd::try_open(info.source_pid)) {
        source_alive = same_process(pidfd::identify(source->borrow()), info.source_inode,
                                    info.source_pid, info.source_uid);
      }
    } catch (const Error&) {
    }
    throw Error(
        ErrorKind::peer_gone, e.code(), op,
        source_alive
            ? "the source process no longer serves grants at " + info.endpoint_text()
            : "the source process (pid " + std::to_string(info.source_pid) + ") has exited");
  }

  // R18: anyone may bind an abstract name. Present the token only to the source itself.
  Fd source_pidfd;
  pidfd::Identity server;
  try {
    if (auto peer = channel.peer_pidfd()) {
      server = pidfd::identify(peer->borrow());
      source_pidfd = std::move(*peer);
    } else {
      const PeerCredentials cred = channel.peer_credentials();
      server.pid = cred.pid;
      server.uid = cred.uid;
    }
  } catch (const Error& e) {
    throw Error(ErrorKind::peer_gone, e.code(), op, "the process serving the endpoint exited");
  }
  if (!same_process(server, info.source_inode, info.source_pid, info.source_uid)) {
    throw Error(ErrorKind::refused, 0, op,
                "the grant endpoint " + info.endpoint_text() + " is served by pid " +
                    std::to_string(server.pid) + ", not by the source pid " +
                    std::to_string(info.source_pid) + " (squatter? R18)");
  }

  const bool fast =
      options.fast_path && (info.flags & SocketInfo::kFlagFastPath) != 0 && source_pidfd.valid();
  std::byte request[20];
  std::memcpy(request, info.token.data(), 16);
  put_le(request + 16, fast ? gp::kRedeemFastPath : 0U, 4);
  channel.send({.type = gp::kRedeem, .payload = request}, left(deadline));

  const ReceiveOptions receive_options{
      .expect = Expect::any_socket, .allow_unix_sockets = info.family == AF_UNIX, .max_fds = 1};
  bool asked_fallback = false;
  Message reply;
  for (;;) {
    try {
      channel.receive(reply, receive_options, left(deadline));
    } catch (const ChannelError& e) {
      // The channel already closed what arrived; tell the source so it can report it.
      (void)channel.try_send({.type = gp::kReject, .payload = text_bytes(e.what())});
      throw;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::peer_gone) throw;
      throw Error(ErrorKind::peer_gone, 0, op, "the source closed the connection before answering");
    }
    Fd socket;
    if (reply.type == gp::kRefused) {
      throw Error(ErrorKind::refused, 0, op,
                  "the source refused: " + std::string(reply.payload_text()));
    } else if (reply.type == gp::kNumber && fast && !asked_fallback && reply.payload.size() == 12 &&
               reply.fds.empty()) {
      const auto number = static_cast<std::int32_t>(get_le(reply.payload.data(), 4));
      pidfd::GetFdResult got = pidfd::get_fd(source_pidfd.borrow(), number);
      int why = got.error;
      if (got.fd.valid() && wrong_socket(got.fd.borrow(), info)) {
        got.fd.reset();
        why = ESTALE;  // not the granted socket: take the SCM_RIGHTS copy instead
      }
      if (!got.fd.valid()) {
        std::byte err[4];
        put_le(err, static_cast<std::uint32_t>(why), 4);
        asked_fallback = true;
        channel.send({.type = gp::kFallback, .payload = err}, left(deadline));
        continue;
      }
      socket = std::move(got.fd);
    } else if (reply.type == gp::kSocket && reply.fds.size() == 1) {
      socket = std::move(reply.fds[0]);
      if (auto why = wrong_socket(socket.borrow(), info)) {
        (void)channel.try_send({.type = gp::kReject, .payload = text_bytes(*why)});
        throw Error(ErrorKind::protocol, 0, op, *why);
      }
    } else {
      throw Error(ErrorKind::protocol, 0, op,
                  "unexpected reply type " + std::to_string(reply.type) + " with " +
                      std::to_string(reply.fds.size()) + " descriptors");
    }
    // A redemption counts only once the source has our ack; for a move the source closes its
    // copy on it, so a lost ack must not leave two owners who each think they hold it alone.
    channel.send({.type = gp::kAck}, left(deadline));
    return socket;
  }
}

SocketInfo inherited_info(std::string_view name) {
  const std::string var(name);
  if (const char* text = std::getenv(var.c_str())) return SocketInfo::parse(text);
  const std::string fd_var = var + "_FD";
  const char* fd_text = std::getenv(fd_var.c_str());
  if (fd_text == nullptr) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + var + ")",
                "neither " + var + " nor " + fd_var + " is set");
  }
  char* end = nullptr;
  const long number = std::strtol(fd_text, &end, 10);
  if (end == fd_text || *end != '\0' || number < 0 || number > 1 << 20) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + fd_var + ")",
                "not a descriptor number");
  }
  Fd fd(static_cast<int>(number));
  // Whatever we read, the variable must not point at a closed (and later reused) number.
  ::unsetenv(fd_var.c_str());
  std::string text;
  char buffer[512];
  while (text.size() < SocketInfo::kTextSize + 2 && text.find('\n') == std::string::npos) {
    const ssize_t n = sys::retry_eintr([&] { return ::read(fd.get(), buffer, sizeof buffer); });
    if (n < 0) sys::throw_errno("read(fd " + std::to_string(fd.get()) + ", socket info)");
    if (n == 0) break;
    text.append(buffer, static_cast<std::size_t>(n));
  }
  return SocketInfo::parse(text.substr(0, text.find('\n')));
}

}  // namespace sockshare
