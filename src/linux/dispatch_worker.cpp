// The worker side of the dispatch protocol (docs/DISPATCH.md): hello, receive connections,
// acknowledge each batch of receives in one message, load reports, drain -> bye.
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <cstring>
#include <string>

#include "byte_order.hpp"
#include "linux/sys.hpp"
#include "sockshare/dispatch.hpp"

namespace sockshare::dispatch {
namespace {

void put_u32(std::byte* out, std::uint32_t v) noexcept { bytes::store_le(out, v); }

void put_u64(std::byte* out, std::uint64_t v) noexcept { bytes::store_le(out, v); }

// Acks wait at most this long for room in the channel: the dispatcher reads continuously,
// so a full channel for this long means it is wedged or gone.
constexpr std::chrono::milliseconds kSendTimeout{5000};

std::optional<unsigned long> parse_env_number(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long value = std::strtoul(text, &end, 10);
  if (errno != 0 || *end != '\0' || value > 0x7FFFFFFF) return std::nullopt;
  return value;
}

}  // namespace

Worker::Worker(Channel channel, std::uint32_t index) : channel_(std::move(channel)), index_(index) {
  std::byte hello[8];
  put_u32(hello, index_);
  put_u32(hello + 4, static_cast<std::uint32_t>(::getpid()));
  channel_.send({.type = kHello, .payload = hello}, kSendTimeout);
}

Worker Worker::from_environment() {
  const auto fd = parse_env_number(kChannelFdEnv);
  const auto index = parse_env_number(kWorkerIndexEnv);
  if (!fd || !index) {
    throw Error(ErrorKind::invalid_input, 0, "dispatch worker from environment",
                std::string(kChannelFdEnv) + " and " + kWorkerIndexEnv +
                    " must name the channel descriptor and the worker index");
  }
  const int channel_fd = static_cast<int>(*fd);
  if (::fcntl(channel_fd, F_GETFD) < 0) {
    sys::throw_errno(std::string(kChannelFdEnv) + "=" + std::to_string(channel_fd));
  }
  // The supervisor had to make it inheritable; programs this worker starts must not get it.
  if (::fcntl(channel_fd, F_SETFD, FD_CLOEXEC) != 0) {
    sys::throw_errno("fcntl(fd " + std::to_string(channel_fd) + ", F_SETFD, FD_CLOEXEC)");
  }
  ::unsetenv(kChannelFdEnv);
  ::unsetenv(kWorkerIndexEnv);
  return Worker(Channel(Fd(channel_fd)), static_cast<std::uint32_t>(*index));
}

// A dispatcher that is gone, or has not read its channel for kSendTimeout, is left: poll()
// returns false and the worker finishes what it holds.
void Worker::send_or_leave(const Outgoing& message) {
  try {
    channel_.send(message, kSendTimeout);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::peer_gone && e.kind() != ErrorKind::timed_out) throw;
    gone_ = true;
  }
}

bool Worker::poll(std::vector<Connection>& out) {
  if (gone_) return false;
  // No per-descriptor type check (R15) here: the peer is the dispatcher this worker was
  // given, which admits only stream listeners (add_listener checks) and sends only what
  // accept() returned on them; the check would add a getsockopt to every connection on the
  // hot path. Unix client connections
  // are what a unix listener yields, so they are allowed (R11 is about sockets that could
  // carry descriptors back into a cycle; these are end points).
  const ReceiveOptions options{.expect = Expect::anything, .allow_unix_sockets = true,
                               .max_fds = wire::kMaxFds};
  ack_ids_.clear();
  // Connections already placed in `out` are this worker's whatever happens next: a later
  // message that fails must not keep their ack from the dispatcher, or it would send them
  // to another worker too.
  std::exception_ptr failure;
  try {
    for (;;) {
      try {
        if (!channel_.try_receive(scratch_, options)) break;
      } catch (const ChannelError& e) {
        if (e.kind() == ErrorKind::peer_gone) {
          gone_ = true;
          break;
        }
        // R9: the descriptors of this batch were lost in transit (this process is at its
        // limit). The dispatcher still holds its copies: tell it which batch, it re-sends them
        // elsewhere instead of waiting for the ack timeout.
        if (e.kind() == ErrorKind::overloaded && e.message_type() == kConnections &&
            e.message_seq() != 0) {
          std::byte payload[8];
          put_u64(payload, e.message_seq());
          send_or_leave({.type = kReject, .payload = payload});
          continue;
        }
        throw;
      } catch (const Error& e) {
        if (e.kind() != ErrorKind::peer_gone) throw;
        gone_ = true;
        break;
      }
      switch (scratch_.type) {
        case kConnections: {
          if (scratch_.fd_meta.size() != scratch_.fds.size() || scratch_.fds.empty()) {
            throw Error(ErrorKind::protocol, 0, "dispatch worker receive",
                        "connections message without one metadata entry per descriptor");
          }
          const std::size_t first = out.size();
          try {
            for (std::size_t i = 0; i < scratch_.fds.size(); ++i) {
              out.push_back({std::move(scratch_.fds[i]), decode_connection_info(scratch_.fd_meta[i])});
            }
          } catch (...) {
            out.resize(first);  // closes what this message brought
            throw;
          }
          for (std::size_t i = first; i < out.size(); ++i) ack_ids_.push_back(out[i].info.id);
          break;
        }
        case kDrain:
          draining_ = true;
          break;
        default:
          throw Error(ErrorKind::protocol, 0, "dispatch worker receive",
                      "unexpected message type " + std::to_string(scratch_.type));
      }
      if (draining_) break;
    }
  } catch (...) {
    failure = std::current_exception();
  }

  // One ack for everything this call received; split only past the message size limit.
  constexpr std::size_t kIdsPerAck = wire::kMaxPayload / 8;
  for (std::size_t start = 0; start < ack_ids_.size() && !gone_; start += kIdsPerAck) {
    const std::size_t n = std::min(kIdsPerAck, ack_ids_.size() - start);
    ack_buffer_.resize(n * 8);
    for (std::size_t i = 0; i < n; ++i) put_u64(ack_buffer_.data() + 8 * i, ack_ids_[start + i]);
    send_or_leave({.type = kAck, .payload = ack_buffer_});
  }
  if (draining_ && !bye_sent_ && !gone_) {
    send_or_leave({.type = kBye});
    bye_sent_ = true;
  }
  if (failure) std::rethrow_exception(failure);
  return !draining_ && !gone_;
}

bool Worker::wait(std::vector<Connection>& out, std::chrono::milliseconds timeout) {
  const auto deadline = sys::deadline_after(timeout);
  const std::size_t before = out.size();
  for (;;) {
    if (!poll(out)) return false;
    if (out.size() > before) return true;
    if (!sys::wait_ready(channel_.native_handle().get(), POLLIN, deadline)) {
      throw Error(ErrorKind::timed_out, 0, "dispatch worker wait", "no connection before the deadline");
    }
  }
}

void Worker::report_load(std::uint32_t active_connections, bool busy) {
  const std::uint32_t value = std::min(active_connections, kLoadBusyBit - 1) | (busy ? kLoadBusyBit : 0);
  if (gone_ || draining_ || last_load_ == value) return;
  std::byte payload[4];
  put_u32(payload, value);
  try {
    // A full channel only delays the report: the next call sends the then-current value.
    if (channel_.try_send({.type = kLoad, .payload = payload})) last_load_ = value;
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::peer_gone) throw;
    gone_ = true;
  }
}

}  // namespace sockshare::dispatch
