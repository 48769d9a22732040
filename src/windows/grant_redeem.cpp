// The target side of a Windows grant: present the token on the source's pipe, turn the
// WSAPROTOCOL_INFOW it answers with into a SOCKET, check it, acknowledge.
#include <winsock2.h>
#include <windows.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "byte_order.hpp"
#include "sockshare/windows/grant.hpp"
#include "win.hpp"

namespace sockshare::windows {

using detail::Handle;

namespace {

std::string payload_text(const detail::PipeMessage& message) {
  return std::string(reinterpret_cast<const char*>(message.payload.data()), message.payload.size());
}

// Opens the source's pipe, waiting while another redemption is being served.
Handle connect_pipe(const SocketInfo& info, std::uint64_t deadline) {
  const std::string name = info.endpoint_text();
  const std::wstring wide = detail::widen(name);
  for (;;) {
    // Identification level only: the source may learn who we are, never act as us.
    Handle pipe(::CreateFileW(wide.c_str(), GENERIC_READ | GENERIC_WRITE, 0, nullptr,
                              OPEN_EXISTING,
                              FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                              nullptr));
    if (pipe.valid()) return pipe;
    const DWORD err = ::GetLastError();
    if (err == ERROR_FILE_NOT_FOUND) {
      throw Error(ErrorKind::peer_gone, 0, "redeem: CreateFileW(" + name + ")",
                  "the source (pid " + std::to_string(info.source_pid) +
                      ") does not serve grants (any more)");
    }
    if (err != ERROR_PIPE_BUSY) throw detail::win_error("redeem: CreateFileW(" + name + ")", err);
    const DWORD left = detail::remaining_ms(deadline);
    if (left == 0 || !::WaitNamedPipeW(wide.c_str(), left)) {
      if (detail::remaining_ms(deadline) == 0 || ::GetLastError() == ERROR_SEM_TIMEOUT) {
        throw Error(ErrorKind::timed_out, 0, "redeem: WaitNamedPipeW(" + name + ")",
                    "the source stayed busy until the deadline");
      }
    }
  }
}

void reject(HANDLE pipe, std::string_view reason, std::uint64_t deadline) {
  try {
    detail::write_message(pipe, grant_protocol::kReject,
                          {reinterpret_cast<const std::byte*>(reason.data()), reason.size()},
                          deadline, nullptr, "reject");
  } catch (const Error&) {
    // The source learns of the failure from the missing ack anyway.
  }
}

}  // namespace

SocketHandle redeem(const SocketInfo& info, const RedeemOptions& options) {
  ensure_winsock();
  const std::uint64_t deadline =
      detail::now_ms() + static_cast<std::uint64_t>(std::max<std::int64_t>(options.timeout.count(), 0));
  Handle pipe = connect_pipe(info, deadline);
  DWORD mode = PIPE_READMODE_MESSAGE;
  if (!::SetNamedPipeHandleState(pipe.get(), &mode, nullptr, nullptr)) {
    detail::throw_last_error("redeem: SetNamedPipeHandleState(message mode)");
  }
  // R18: the token goes only to the process that made the grant. The pipe was created as
  // the name's only instance, so a squatter would have to own the name itself.
  ULONG server = 0;
  if (!::GetNamedPipeServerProcessId(pipe.get(), &server)) {
    detail::throw_last_error("redeem: GetNamedPipeServerProcessId");
  }
  if (server != static_cast<ULONG>(info.source_pid)) {
    throw Error(ErrorKind::refused, 0, "redeem(" + info.endpoint_text() + ")",
                "the pipe is served by pid " + std::to_string(server) + ", not by the source pid " +
                    std::to_string(info.source_pid) + " (squatter?)");
  }
  // And the same source process as when the grant was made: its creation time.
  const Handle source(::OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, server));
  if (!source.valid() || detail::creation_time(source.get()) != info.source_inode) {
    throw Error(ErrorKind::refused, 0, "redeem(" + info.endpoint_text() + ")",
                "pid " + std::to_string(server) +
                    " is not the process that made the grant (creation time differs)");
  }
  std::array<std::byte, 20> request{};
  std::memcpy(request.data(), info.token.data(), info.token.size());
  bytes::store_le<std::uint32_t>(request.data() + 16, 0);
  detail::write_message(pipe.get(), grant_protocol::kRedeem, request, deadline, nullptr, "redeem");
  const detail::PipeMessage answer = detail::read_message(pipe.get(), deadline, nullptr, "answer");
  if (answer.type == grant_protocol::kRefused) {
    throw Error(ErrorKind::refused, 0, "redeem(grant from pid " + std::to_string(info.source_pid) + ")",
                "the source refused: " + payload_text(answer));
  }
  WSAPROTOCOL_INFOW protocol_info{};
  if (answer.type != grant_protocol::kSocket || answer.payload.size() != sizeof protocol_info) {
    reject(pipe.get(), "unexpected answer", deadline);
    throw Error(ErrorKind::protocol, 0, "redeem",
                "expected a " + std::to_string(sizeof protocol_info) +
                    "-byte WSAPROTOCOL_INFOW, got type " + std::to_string(answer.type) + " with " +
                    std::to_string(answer.payload.size()) + " bytes");
  }
  std::memcpy(&protocol_info, answer.payload.data(), sizeof protocol_info);
  if (protocol_info.iAddressFamily != info.family || protocol_info.iSocketType != info.type ||
      protocol_info.iProtocol != info.protocol) {
    reject(pipe.get(), "the protocol info does not describe the granted socket", deadline);
    throw Error(ErrorKind::protocol, 0, "redeem",
                "the source sent family/type/protocol " + std::to_string(protocol_info.iAddressFamily) +
                    "/" + std::to_string(protocol_info.iSocketType) + "/" +
                    std::to_string(protocol_info.iProtocol) + ", the info says " + info.describe());
  }
  SocketHandle socket(::WSASocketW(FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO,
                                   &protocol_info, 0,
                                   WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT));
  if (!socket.valid()) {
    const DWORD err = static_cast<DWORD>(::WSAGetLastError());
    reject(pipe.get(), "WSASocketW failed: " + detail::describe_error(err), deadline);
    throw detail::win_error("redeem: WSASocketW(FROM_PROTOCOL_INFO)", err);
  }
  // What the handle is, asked of the handle itself (R15).
  detail::SocketKind kind{};
  try {
    kind = detail::socket_kind(socket.get());
  } catch (const Error& e) {
    reject(pipe.get(), e.what(), deadline);
    throw;
  }
  if (kind.family != info.family || kind.type != info.type || kind.protocol != info.protocol) {
    reject(pipe.get(), "the socket is not of the granted kind", deadline);
    throw Error(ErrorKind::protocol, 0, "redeem", "the socket received is not " + info.describe());
  }
  detail::write_message(pipe.get(), grant_protocol::kAck, {}, deadline, nullptr, "ack");
  return socket;
}

SocketInfo inherited_info(std::string_view name) {
  const std::string variable(name);
  char buffer[SocketInfo::kTextSize + 64] = {};
  const DWORD n = ::GetEnvironmentVariableA(variable.c_str(), buffer, sizeof buffer);
  if (n == 0 || n >= sizeof buffer) {
    throw Error(ErrorKind::invalid_input, 0, "inherited_info(" + variable + ")",
                n == 0 ? "the variable is not set" : "the value is too long for an info");
  }
  return SocketInfo::parse(std::string_view(buffer, n));
}

}  // namespace sockshare::windows
