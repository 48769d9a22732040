// Whole messages from a hostile peer through a real socket pair into Channel::try_receive:
// the decoders plus the channel's descriptor accounting. Input: one control byte (bits
// 0-1: how many pipe write ends to attach; bit 2: overwrite magic and version with valid
// ones so the fuzzer reaches the later checks quickly), then the message bytes.
// Invariant: whatever happens, once the Message is gone no copy of an attached write end
// survives, so every pipe read end is at end-of-file.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "sockshare/channel.hpp"
#include "sockshare/wire.hpp"

namespace {

using namespace sockshare;

std::pair<Channel, Channel>& channels() {
  static auto pair = Channel::pair();
  return pair;
}

void send_raw(int fd, const std::vector<std::byte>& bytes, const std::vector<int>& fds) {
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 3)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  if (::sendmsg(fd, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size())) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > wire::kMaxMessage + 64) return 0;
  const std::uint8_t control = data[0];
  std::vector<std::byte> bytes(size - 1);
  if (!bytes.empty()) std::memcpy(bytes.data(), data + 1, size - 1);
  if ((control & 4) && bytes.size() >= 5) {
    const std::uint8_t magic_version[5] = {0x53, 0x4B, 0x53, 0x48, wire::kVersion};
    std::memcpy(bytes.data(), magic_version, 5);
  }

  std::vector<int> read_ends;
  std::vector<int> write_ends;
  for (int i = 0; i < (control & 3); ++i) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) __builtin_trap();
    read_ends.push_back(p[0]);
    write_ends.push_back(p[1]);
  }
  auto& [sender, receiver] = channels();
  send_raw(sender.native_handle().get(), bytes, write_ends);
  for (int w : write_ends) ::close(w);

  {
    Message message;
    try {
      if (!receiver.try_receive(message)) __builtin_trap();  // the message is queued
      if (message.fds.size() != read_ends.size()) __builtin_trap();
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::protocol) __builtin_trap();
    }
  }
  for (int r : read_ends) {
    pollfd p{r, POLLIN, 0};
    if (::poll(&p, 1, 0) != 1 || (p.revents & POLLHUP) == 0) __builtin_trap();
    ::close(r);
  }
  return 0;
}
