// The source side of a Windows grant: the table of grants and the named-pipe server that
// hands a WSAPROTOCOL_INFOW to the target only after checking who is asking.
#include <winsock2.h>
#include <windows.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "sockshare/windows/grant.hpp"
#include "win.hpp"

namespace sockshare::windows {

using detail::Handle;

namespace {

constexpr std::uint64_t kNsPerMs = 1'000'000;
// How often pending grants are checked for a target that has exited, at most.
constexpr DWORD kExitPollMs = 200;

std::string hex(std::span<const std::uint8_t> bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (std::uint8_t b : bytes) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

// A second SOCKET for the same socket, owned by this process: the grant's own reference,
// so that the caller may close theirs while the grant is pending (as on Linux).
SocketHandle duplicate_in_self(SOCKET socket) {
  WSAPROTOCOL_INFOW info{};
  if (::WSADuplicateSocketW(socket, ::GetCurrentProcessId(), &info) != 0) {
    detail::throw_last_wsa_error("WSADuplicateSocketW(own process)");
  }
  SocketHandle copy(::WSASocketW(FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, &info,
                                 0, WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT));
  if (!copy.valid()) detail::throw_last_wsa_error("WSASocketW(FROM_PROTOCOL_INFO, own process)");
  return copy;
}

std::span<const std::byte> text_bytes(std::string_view text) {
  return {reinterpret_cast<const std::byte*>(text.data()), text.size()};
}

}  // namespace

class GrantServer::Impl {
 public:
  struct Grant {
    SocketInfo info;
    SocketHandle socket;  // share: the grant's duplicate; move: the caller's socket
    Handle process;       // the target, held so that its id cannot name another process
  };

  explicit Impl(GrantServerOptions options) : options_(std::move(options)) {
    ensure_winsock();
    std::array<std::uint8_t, 8> random{};
    detail::random_bytes(random);
    pipe_name_ = "\\\\.\\pipe\\sockshare-" + std::to_string(::GetCurrentProcessId()) + "-" +
                 hex(random);
    // One instance, created first: if the name exists already (squatted), this fails, and
    // while it exists nobody else can add an instance that redeemers might reach.
    pipe_ = Handle(::CreateNamedPipeW(
        detail::widen(pipe_name_).c_str(),
        PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE,
        PIPE_TYPE_MESSAGE | PIPE_READMODE_MESSAGE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS, 1,
        static_cast<DWORD>(detail::kMaxPipeMessage), static_cast<DWORD>(detail::kMaxPipeMessage),
        0, nullptr));
    if (!pipe_.valid()) detail::throw_last_error("CreateNamedPipeW(" + pipe_name_ + ")");
    stop_ = Handle(::CreateEventW(nullptr, TRUE, FALSE, nullptr));
    wake_ = Handle(::CreateEventW(nullptr, FALSE, FALSE, nullptr));
    connected_ = Handle(::CreateEventW(nullptr, TRUE, FALSE, nullptr));
    if (!stop_.valid() || !wake_.valid() || !connected_.valid()) {
      detail::throw_last_error("CreateEventW");
    }
    thread_ = std::thread([this] { run(); });
  }

  ~Impl() {
    ::SetEvent(stop_.get());
    if (thread_.joinable()) thread_.join();
    std::vector<Grant> left;
    {
      std::lock_guard lock(mutex_);
      left.swap(grants_);
    }
    for (Grant& grant : left) report(grant, GrantOutcome::revoked, "the grant server was destroyed");
  }

  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  SocketInfo add(ShareMode mode, BorrowedSocket socket, SocketHandle* moved, const Target& target,
                 const GrantOptions& options) {
    const detail::SocketKind kind = detail::socket_kind(socket.get());
    const DWORD pid = target.pid_value();
    Handle process(::OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, pid));
    if (!process.valid()) {
      const DWORD err = ::GetLastError();
      throw Error(ErrorKind::refused, 0, "OpenProcess(target pid " + std::to_string(pid) + ")",
                  detail::describe_error(err) + "; no such process?");
    }
    if (::WaitForSingleObject(process.get(), 0) == WAIT_OBJECT_0) {
      throw Error(ErrorKind::refused, 0, "duplicate(target pid " + std::to_string(pid) + ")",
                  "the target has exited");
    }
    Grant grant;
    SocketInfo& info = grant.info;
    info.mode = mode;
    info.family = kind.family;
    info.type = kind.type;
    info.protocol = kind.protocol;
    info.source_pid = static_cast<std::int32_t>(::GetCurrentProcessId());
    info.source_inode = detail::creation_time(::GetCurrentProcess());
    info.target_pid = static_cast<std::int32_t>(pid);
    info.target_inode = detail::creation_time(process.get());
    info.expires_ns =
        detail::monotonic_ns() + static_cast<std::uint64_t>(std::max<std::int64_t>(
                                     options.ttl.count(), 0)) * kNsPerMs;
    detail::random_bytes(info.token);
    std::copy(pipe_name_.begin(), pipe_name_.end(), info.endpoint.begin());
    grant.process = std::move(process);
    if (mode == ShareMode::share) grant.socket = duplicate_in_self(socket.get());
    {
      std::lock_guard lock(mutex_);
      if (grants_.size() >= options_.max_grants) {
        throw Error(ErrorKind::overloaded, 0, "duplicate",
                    "the grant table is full (" + std::to_string(options_.max_grants) + ")");
      }
      const auto for_target = std::count_if(grants_.begin(), grants_.end(), [&](const Grant& g) {
        return g.info.target_pid == info.target_pid;
      });
      if (static_cast<std::size_t>(for_target) >= options_.max_grants_per_target) {
        throw Error(ErrorKind::overloaded, 0, "duplicate",
                    "pid " + std::to_string(pid) + " already has " + std::to_string(for_target) +
                        " pending grants");
      }
      grants_.reserve(grants_.size() + 1);
      // Nothing below throws: a move takes the caller's socket only now.
      if (moved != nullptr) grant.socket = std::move(*moved);
      grants_.push_back(std::move(grant));
    }
    ::SetEvent(wake_.get());
    return info;
  }

  SocketHandle revoke(const SocketInfo& info) {
    std::optional<Grant> grant = take(info.token);
    if (!grant) return {};
    return std::move(grant->socket);
  }

  GrantServerStats stats() const {
    std::lock_guard lock(mutex_);
    GrantServerStats copy = stats_;
    copy.pending = grants_.size();
    return copy;
  }

  const std::string& endpoint() const noexcept { return pipe_name_; }

 private:
  // Removes and returns the grant with `token`; every entry is compared in full, so the
  // time taken does not tell how much of a guessed token matched.
  std::optional<Grant> take(std::span<const std::uint8_t> token) {
    std::lock_guard lock(mutex_);
    std::size_t found = grants_.size();
    for (std::size_t i = 0; i < grants_.size(); ++i) {
      if (detail::equal_constant_time(grants_[i].info.token, token)) found = i;
    }
    if (found == grants_.size()) return std::nullopt;
    std::optional<Grant> grant(std::move(grants_[found]));
    grants_.erase(grants_.begin() + static_cast<std::ptrdiff_t>(found));
    return grant;
  }

  void report(Grant& grant, GrantOutcome outcome, std::string detail) {
    GrantEvent event{grant.info, outcome, std::move(detail), {}};
    if (grant.info.mode == ShareMode::move && outcome != GrantOutcome::redeemed) {
      event.returned = std::move(grant.socket);
    }
    // A redeemed move closes the source's copy here, after the target's ack (S5).
    grant.socket.reset();
    grant.process.reset();
    if (!options_.on_event) return;
    try {
      options_.on_event(event);
    } catch (...) {
      // The callback's failure must not take down the thread that serves every grant.
    }
  }

  void count(GrantOutcome outcome) {
    std::lock_guard lock(mutex_);
    switch (outcome) {
      case GrantOutcome::redeemed: ++stats_.redeemed; break;
      case GrantOutcome::refused: ++stats_.refused; break;
      case GrantOutcome::expired: ++stats_.expired; break;
      case GrantOutcome::target_exited: ++stats_.target_exited; break;
      case GrantOutcome::failed: ++stats_.failed; break;
      default: break;
    }
  }

  // Ends grants that expired or whose target exited; returns how long to wait until the
  // next one can end.
  DWORD sweep() {
    std::vector<std::pair<Grant, GrantOutcome>> ended;
    DWORD wait = INFINITE;
    {
      std::lock_guard lock(mutex_);
      const std::uint64_t now = detail::monotonic_ns();
      for (auto it = grants_.begin(); it != grants_.end();) {
        if (now >= it->info.expires_ns) {
          ended.emplace_back(std::move(*it), GrantOutcome::expired);
        } else if (::WaitForSingleObject(it->process.get(), 0) == WAIT_OBJECT_0) {
          ended.emplace_back(std::move(*it), GrantOutcome::target_exited);
        } else {
          const std::uint64_t left_ms = (it->info.expires_ns - now + kNsPerMs - 1) / kNsPerMs;
          wait = std::min<DWORD>({wait, kExitPollMs, static_cast<DWORD>(std::min<std::uint64_t>(
                                                         left_ms, kExitPollMs))});
          ++it;
          continue;
        }
        it = grants_.erase(it);
      }
    }
    for (auto& [grant, outcome] : ended) {
      count(outcome);
      report(grant, outcome,
             outcome == GrantOutcome::expired ? "nobody redeemed it in time"
                                              : "the target exited before redeeming it");
    }
    return wait;
  }

  void run() {
    OVERLAPPED ov{};
    bool pending = false;
    for (;;) {
      if (!pending) {
        ov = OVERLAPPED{};
        ov.hEvent = connected_.get();
        ::ResetEvent(connected_.get());
        const BOOL ok = ::ConnectNamedPipe(pipe_.get(), &ov);
        const DWORD err = ok ? ERROR_SUCCESS : ::GetLastError();
        if (ok || err == ERROR_PIPE_CONNECTED) {
          serve();
          continue;
        }
        if (err == ERROR_IO_PENDING) {
          pending = true;
        } else {
          // A client that connected and left already (ERROR_NO_DATA), or a transient
          // failure: reset the instance and listen again after the wait below.
          ::DisconnectNamedPipe(pipe_.get());
        }
      }
      HANDLE waits[3] = {stop_.get(), wake_.get(), connected_.get()};
      DWORD timeout = sweep();
      if (!pending) timeout = std::min<DWORD>(timeout, kExitPollMs);
      const DWORD r = ::WaitForMultipleObjects(pending ? 3 : 2, waits, FALSE, timeout);
      if (r == WAIT_OBJECT_0) {
        if (pending) {
          ::CancelIoEx(pipe_.get(), &ov);
          DWORD ignored = 0;
          ::GetOverlappedResult(pipe_.get(), &ov, &ignored, TRUE);
        }
        return;
      }
      if (pending && r == WAIT_OBJECT_0 + 2) {
        pending = false;
        DWORD ignored = 0;
        if (::GetOverlappedResult(pipe_.get(), &ov, &ignored, FALSE)) {
          serve();
        } else {
          ::DisconnectNamedPipe(pipe_.get());
        }
      }
    }
  }

  // Best effort: the redeemer learns why, then the session ends either way.
  void refuse(std::string_view reason, std::uint64_t deadline) {
    try {
      detail::write_message(pipe_.get(), grant_protocol::kRefused, text_bytes(reason), deadline,
                            stop_.get(), "refused");
    } catch (const Error&) {
    }
  }

  // Waits (until the deadline) for the redeemer to close its end, so that nothing we wrote
  // is discarded by DisconnectNamedPipe before it was read.
  void linger(std::uint64_t deadline) {
    try {
      for (int i = 0; i < 4; ++i) (void)detail::read_message(pipe_.get(), deadline, stop_.get(), "close");
    } catch (const Error&) {
    }
  }

  void serve() {
    const std::uint64_t deadline =
        detail::now_ms() + static_cast<std::uint64_t>(options_.session_timeout.count());
    ULONG client = 0;
    if (!::GetNamedPipeClientProcessId(pipe_.get(), &client)) client = 0;
    std::optional<Grant> grant;
    GrantOutcome outcome = GrantOutcome::failed;
    std::string why;
    try {
      const detail::PipeMessage request =
          detail::read_message(pipe_.get(), deadline, stop_.get(), "redeem");
      if (request.type != grant_protocol::kRedeem || request.payload.size() != 20) {
        refuse("expected a redeem message", deadline);
      } else {
        std::array<std::uint8_t, 16> token{};
        std::memcpy(token.data(), request.payload.data(), token.size());
        grant = take(token);  // single use: gone from the table whatever happens next
        if (!grant) refuse("no such grant (used, expired, revoked or never made)", deadline);
      }
      if (grant) {
        {
          std::lock_guard lock(mutex_);
          ++stats_.in_progress;
        }
        outcome = exchange(*grant, client, deadline, why);
      }
    } catch (const Error& e) {
      why = e.what();
    }
    linger(deadline);
    ::DisconnectNamedPipe(pipe_.get());
    if (grant) {
      {
        std::lock_guard lock(mutex_);
        --stats_.in_progress;
      }
      count(outcome);
      report(*grant, outcome, why);
    }
  }

  GrantOutcome exchange(Grant& grant, ULONG client, std::uint64_t deadline, std::string& why) {
    const SocketInfo& info = grant.info;
    if (detail::monotonic_ns() >= info.expires_ns) {
      why = "expired before it was presented";
      refuse(why, deadline);
      return GrantOutcome::expired;
    }
    // The process handle held since duplicate() keeps the target's id from being reused,
    // so an equal id is the target itself.
    if (client == 0 || client != static_cast<ULONG>(info.target_pid)) {
      why = "bound to pid " + std::to_string(info.target_pid) + ", presented by pid " +
            std::to_string(client);
      refuse(why, deadline);
      return GrantOutcome::refused;
    }
    // The same process as at duplicate() time: redundant while the handle is held (see
    // above), but it is the check that does not depend on that rule.
    const Handle client_process(::OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, client));
    const std::uint64_t created = client_process.valid() ? detail::creation_time(client_process.get()) : 0;
    if (created == 0 || created != info.target_inode) {
      why = "pid " + std::to_string(client) + " is not the process the grant was made for " +
            "(creation time differs)";
      refuse(why, deadline);
      return GrantOutcome::refused;
    }
    WSAPROTOCOL_INFOW protocol_info{};
    if (::WSADuplicateSocketW(grant.socket.get(), static_cast<DWORD>(info.target_pid),
                              &protocol_info) != 0) {
      why = "WSADuplicateSocketW: " +
            detail::describe_error(static_cast<DWORD>(::WSAGetLastError()));
      refuse(why, deadline);
      return GrantOutcome::failed;
    }
    static_assert(sizeof protocol_info == 628);
    detail::write_message(pipe_.get(), grant_protocol::kSocket,
                          {reinterpret_cast<const std::byte*>(&protocol_info), sizeof protocol_info},
                          deadline, stop_.get(), "socket");
    const detail::PipeMessage answer = detail::read_message(pipe_.get(), deadline, stop_.get(), "ack");
    if (answer.type == grant_protocol::kAck && answer.payload.empty()) return GrantOutcome::redeemed;
    if (answer.type == grant_protocol::kReject) {
      why = "the target rejected the socket: " +
            std::string(reinterpret_cast<const char*>(answer.payload.data()), answer.payload.size());
    } else {
      why = "unexpected message type " + std::to_string(answer.type) + " instead of the ack";
    }
    return GrantOutcome::failed;
  }

  GrantServerOptions options_;
  std::string pipe_name_;
  Handle pipe_;
  Handle stop_;
  Handle wake_;       // auto-reset: the table changed, recompute the next expiry
  Handle connected_;  // manual-reset: ConnectNamedPipe completed
  mutable std::mutex mutex_;
  std::vector<Grant> grants_;
  GrantServerStats stats_;
  std::thread thread_;
};

GrantServer::GrantServer(GrantServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

GrantServer::~GrantServer() = default;

SocketInfo GrantServer::duplicate(BorrowedSocket socket, const Target& target,
                                  const GrantOptions& options) {
  return impl_->add(ShareMode::share, socket, nullptr, target, options);
}

SocketInfo GrantServer::move(SocketHandle&& socket, const Target& target,
                             const GrantOptions& options) {
  return impl_->add(ShareMode::move, socket.borrow(), &socket, target, options);
}

SocketHandle GrantServer::revoke(const SocketInfo& info) { return impl_->revoke(info); }

const std::string& GrantServer::endpoint() const noexcept { return impl_->endpoint(); }

GrantServerStats GrantServer::stats() const { return impl_->stats(); }

}  // namespace sockshare::windows
