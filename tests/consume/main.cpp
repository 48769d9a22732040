// Passes a pipe through a channel using only the installed headers and library.
#include <sockshare/channel.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>

int main() {
  auto [a, b] = sockshare::Channel::pair();
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return 1;
  sockshare::Fd read_end(p[0]);
  sockshare::Fd write_end(p[1]);
  sockshare::BorrowedFd fds[] = {write_end.borrow()};
  a.send({.type = 1, .fds = fds});
  sockshare::Message m = b.receive({}, std::chrono::seconds(5));
  write_end.reset();
  if (m.fds.size() != 1 || ::write(m.fds[0].get(), "k", 1) != 1) return 1;
  char c = 0;
  if (::read(read_end.get(), &c, 1) != 1 || c != 'k') return 1;
  std::puts("consume: ok");
  return 0;
}
