// SocketIdentity::describe() for the Windows build (SocketInfo::describe() uses it); the
// numbers are Windows' own (AF_INET6 is 23 there, 10 on Linux).
#include <winsock2.h>
#include <ws2tcpip.h>

#include <string>

#include "sockshare/socket.hpp"

namespace sockshare {

std::string SocketIdentity::describe() const {
  if (!is_socket) return "non-socket handle";
  std::string text;
  switch (family) {
    case AF_INET: text = protocol == IPPROTO_UDP ? "udp4" : "tcp4"; break;
    case AF_INET6: text = protocol == IPPROTO_UDP ? "udp6" : "tcp6"; break;
    default: text = "family " + std::to_string(family); break;
  }
  switch (type) {
    case SOCK_STREAM:
    case SOCK_DGRAM: break;
    default: text += " type " + std::to_string(type); break;
  }
  if (listening) text += " listener";
  return text;
}

}  // namespace sockshare
