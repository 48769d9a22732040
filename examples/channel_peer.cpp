// The C++ end of the Python interoperability example (examples/python/pass_socket.py):
//
//   channel_peer unix:/path/peer.sock
//
// Listens on the path, accepts one channel and answers its messages:
//   type 1 (handoff)  one TCP stream socket with metadata: writes a greeting through the
//                     socket, then sends back a pipe carrying text and the socket itself
//                     (type 2), each with its own metadata.
//   type 3 (bye)      answers type 4 and exits 0.
// Anything malformed or unexpected (a bad header, a descriptor that is not a TCP stream) is
// answered with type 5 carrying the error text; the channel closed the descriptors before
// the error reached this program. Prints "listening <endpoint>" on stdout when ready.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "sockshare/channel.hpp"

namespace {

using namespace sockshare;

constexpr std::uint16_t kHandoff = 1;
constexpr std::uint16_t kReturned = 2;
constexpr std::uint16_t kBye = 3;
constexpr std::uint16_t kByeAck = 4;
constexpr std::uint16_t kRejected = 5;
// The driving script answers within milliseconds; a silent peer means it is gone or stuck.
constexpr auto kTimeout = std::chrono::seconds(20);

std::span<const std::byte> bytes_of(std::string_view text) {
  return std::as_bytes(std::span<const char>(text.data(), text.size()));
}

std::string text_of(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// Writes all of `text`. This program installs no signal handlers, so nothing interrupts a
// blocking write with EINTR; a short write just continues.
void write_all(BorrowedFd fd, std::string_view text, bool is_socket, const char* what) {
  while (!text.empty()) {
    // MSG_NOSIGNAL: a client that went away is an error here, not a SIGPIPE.
    const ssize_t n = is_socket ? ::send(fd.get(), text.data(), text.size(), MSG_NOSIGNAL)
                                : ::write(fd.get(), text.data(), text.size());
    if (n < 0)
      throw Error::from_errno(std::string(is_socket ? "send to " : "write to ") + what, errno);
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

void handle_handoff(Channel& channel, Message& message) {
  if (message.fds.size() != 1) {
    throw Error(ErrorKind::protocol, 0, "handoff", "expected exactly one descriptor");
  }
  Fd socket = std::move(message.fds[0]);
  // The socket may have arrived non-blocking (R14: the flag is shared with the sender).
  set_nonblocking(socket.borrow(), false);
  const std::string meta = message.fd_meta.empty() ? "" : text_of(message.fd_meta[0]);
  const std::string greeting = "hello from C++ pid=" + std::to_string(::getpid()) +
                               " seq=" + std::to_string(message.seq) +
                               " kind=" + identify(socket.borrow()).describe() + " meta=" + meta +
                               " payload=" + std::string(message.payload_text()) + "\n";
  write_all(socket.borrow(), greeting, true, "the handed-off socket");

  // The other direction: a pipe whose write end is closed after the text, so the reader
  // sees end of file, and the socket itself, to prove both ends hold the same one.
  std::array<int, 2> p{};
  if (::pipe2(p.data(), O_CLOEXEC) != 0) throw Error::from_errno("pipe2", errno);
  Fd read_end(p[0]);
  Fd write_end(p[1]);
  write_all(write_end.borrow(), "piped text from C++ pid=" + std::to_string(::getpid()) + "\n",
            false, "the pipe");
  write_end.reset();
  const std::array<BorrowedFd, 2> fds = {read_end.borrow(), socket.borrow()};
  const std::array<std::span<const std::byte>, 2> fd_meta = {bytes_of("pipe"), bytes_of("")};
  const std::string reply = "handoff " + std::to_string(message.seq) + " served";
  channel.send(
      Outgoing{.type = kReturned, .payload = bytes_of(reply), .fds = fds, .fd_meta = fd_meta},
      kTimeout);
  // Both descriptors are closed here: the peer holds its own copies now.
}

int serve(const Endpoint& endpoint) {
  auto listener = ChannelListener::listen(endpoint);
  std::printf("listening %s\n", endpoint.to_string().c_str());
  std::fflush(stdout);
  Channel channel = listener.accept(kTimeout);

  ReceiveOptions options;
  options.expect = Expect::tcp_stream;  // R15: a handoff carries a TCP stream socket, nothing else
  options.max_fds = 1;
  Message message;
  for (;;) {
    try {
      channel.receive(message, options, kTimeout);
    } catch (const ChannelError& e) {
      if (e.kind() != ErrorKind::protocol) throw;
      // The message is consumed and its descriptors are closed; the channel stays usable.
      std::fprintf(stderr, "channel_peer: protocol error: %s\n", e.what());
      channel.send(Outgoing{.type = kRejected, .payload = bytes_of(e.what())}, kTimeout);
      continue;
    }
    switch (message.type) {
      case kHandoff:
        handle_handoff(channel, message);
        break;
      case kBye:
        channel.send(Outgoing{.type = kByeAck, .payload = bytes_of("bye")}, kTimeout);
        return 0;
      default: {
        const std::string why = "unknown message type " + std::to_string(message.type);
        std::fprintf(stderr, "channel_peer: %s\n", why.c_str());
        message.fds.clear();
        channel.send(Outgoing{.type = kRejected, .payload = bytes_of(why)}, kTimeout);
        break;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s unix:/path/to/socket\n", argv[0]);
    return 2;
  }
  // Dies with whatever started it, so a killed test driver leaves nothing running.
  const pid_t parent = ::getppid();
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) return 1;
  try {
    return serve(parse_endpoint(argv[1]));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "channel_peer: %s\n", e.what());
    return 1;
  }
}
