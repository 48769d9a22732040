// The dispatcher's platform-neutral parts: the per-connection metadata codec (docs/DISPATCH.md
// is the normative layout) and the Prometheus rendering of its counters.
#include <cstdio>
#include <cstring>
#include <string>

#include "sockshare/dispatch.hpp"
#include "sockshare/error.hpp"

#include "byte_order.hpp"

namespace sockshare::dispatch {
namespace {

constexpr std::uint8_t kInfoVersion = 1;
// Fixed part: version, flags, listener_len, peer_len, reserved, id, accepted_at_ns, initial_len.
constexpr std::size_t kInfoFixed = 28;

template <class T>
void put(std::byte* out, T value) noexcept {
  bytes::store_le(out, value);
}

template <class T>
T get(const std::byte* in) noexcept {
  return bytes::load_le<T>(in);
}

[[noreturn]] void malformed(std::string_view why) {
  throw Error(ErrorKind::protocol, 0, "decode connection metadata", why);
}

}  // namespace

std::vector<std::byte> encode_connection_info(const ConnectionInfo& info) {
  std::vector<std::byte> out;
  encode_connection_info(info, out);
  return out;
}

void encode_connection_info(const ConnectionInfo& info, std::vector<std::byte>& out) {
  if (info.listener.size() > 0xFFFF || info.peer.size() > 0xFFFF ||
      info.initial_bytes.size() > wire::kMaxPayload) {
    throw Error(ErrorKind::invalid_input, 0, "encode connection metadata",
                "listener name, peer or initial bytes too long");
  }
  out.resize(kInfoFixed + info.listener.size() + info.peer.size() + info.initial_bytes.size());
  std::byte* p = out.data();
  put<std::uint8_t>(p + 0, kInfoVersion);
  put<std::uint8_t>(p + 1, 0);
  put<std::uint16_t>(p + 2, info.listener.size());
  put<std::uint16_t>(p + 4, info.peer.size());
  put<std::uint16_t>(p + 6, 0);
  put<std::uint64_t>(p + 8, info.id);
  put<std::uint64_t>(p + 16, static_cast<std::uint64_t>(info.accepted_at_ns));
  put<std::uint32_t>(p + 24, info.initial_bytes.size());
  p += kInfoFixed;
  if (!info.listener.empty()) std::memcpy(p, info.listener.data(), info.listener.size());
  p += info.listener.size();
  if (!info.peer.empty()) std::memcpy(p, info.peer.data(), info.peer.size());
  p += info.peer.size();
  if (!info.initial_bytes.empty()) {
    std::memcpy(p, info.initial_bytes.data(), info.initial_bytes.size());
  }
}

ConnectionInfo decode_connection_info(std::span<const std::byte> bytes) {
  if (bytes.size() < kInfoFixed) malformed("shorter than the 28-byte fixed part");
  const std::byte* p = bytes.data();
  if (get<std::uint8_t>(p) != kInfoVersion) {
    malformed("unsupported version " + std::to_string(get<std::uint8_t>(p)));
  }
  if (get<std::uint8_t>(p + 1) != 0 || get<std::uint16_t>(p + 6) != 0) {
    malformed("non-zero reserved field");
  }
  const std::size_t listener_len = get<std::uint16_t>(p + 2);
  const std::size_t peer_len = get<std::uint16_t>(p + 4);
  const std::size_t initial_len = get<std::uint32_t>(p + 24);
  // 64-bit sum: three lengths below 2^32 cannot overflow it.
  const std::uint64_t expected = std::uint64_t{kInfoFixed} + listener_len + peer_len + initial_len;
  if (expected != bytes.size()) {
    malformed("lengths announce " + std::to_string(expected) + " bytes, entry has " +
              std::to_string(bytes.size()));
  }
  ConnectionInfo info;
  info.id = get<std::uint64_t>(p + 8);
  info.accepted_at_ns = static_cast<std::int64_t>(get<std::uint64_t>(p + 16));
  const char* text = reinterpret_cast<const char*>(p + kInfoFixed);
  info.listener.assign(text, listener_len);
  info.peer.assign(text + listener_len, peer_len);
  const std::byte* initial = p + kInfoFixed + listener_len + peer_len;
  info.initial_bytes.assign(initial, initial + initial_len);
  return info;
}

std::string Stats::prometheus() const {
  std::string out;
  out.reserve(4096);
  auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
    out += name;
    char number[64];
    std::snprintf(number, sizeof number, " %.17g\n", value);
    out += number;
  };
  auto counter = [&](const char* name, const char* help, std::uint64_t value) {
    metric(name, "counter", help, static_cast<double>(value));
  };
  counter("sockshare_connections_accepted_total", "Connections accepted.", accepted);
  counter("sockshare_connections_dispatched_total",
          "Connections sent to a worker (a re-dispatch counts again).", dispatched);
  counter("sockshare_connections_acknowledged_total",
          "Connections a worker acknowledged.", acknowledged);
  counter("sockshare_connections_redispatched_total",
          "Unacknowledged connections returned by a lost worker and sent again.", redispatched);
  counter("sockshare_connections_dropped_total",
          "Accepted connections closed without reaching a worker.", dropped);
  counter("sockshare_connections_abandoned_total",
          "Of the dropped, connections closed after max_attempts workers were lost reading them.",
          abandoned);
  counter("sockshare_accept_errors_total", "accept() failures other than EAGAIN.", accept_errors);
  counter("sockshare_accept_emfile_total",
          "accept() failures at the descriptor limit (EMFILE/ENFILE).", emfile_events);
  counter("sockshare_backpressure_pauses_total",
          "Times accepting paused because every worker was full.", backpressure_pauses);
  counter("sockshare_worker_protocol_errors_total",
          "Workers cut off for a malformed or unexpected message.", worker_protocol_errors);
  counter("sockshare_workers_joined_total", "Workers added.", workers_joined);
  counter("sockshare_workers_lost_total", "Workers removed or cut off.", workers_lost);
  counter("sockshare_rejected_batches_total",
          "Batches a worker could not receive (descriptors lost at its limit).", rejected_batches);
  counter("sockshare_peek_timeouts_total",
          "Connections handed off without first bytes after the peek timeout.", peek_timeouts);
  metric("sockshare_workers", "gauge", "Workers connected now.", workers);
  metric("sockshare_connections_in_flight", "gauge",
         "Connections sent and not yet acknowledged.", in_flight);
  metric("sockshare_connections_pending", "gauge",
         "Accepted connections waiting for a worker with room.", pending);

  const char* hist = "sockshare_handoff_latency_seconds";
  out += "# HELP ";
  out += hist;
  out += " Time from accept to the worker's acknowledgement.\n# TYPE ";
  out += hist;
  out += " histogram\n";
  std::uint64_t cumulative = 0;
  char line[160];
  for (std::size_t i = 0; i < latency_counts.size(); ++i) {
    cumulative += latency_counts[i];
    if (i < latency_bounds_us.size()) {
      std::snprintf(line, sizeof line, "%s_bucket{le=\"%g\"} %llu\n", hist,
                    latency_bounds_us[i] / 1e6, static_cast<unsigned long long>(cumulative));
    } else {
      std::snprintf(line, sizeof line, "%s_bucket{le=\"+Inf\"} %llu\n", hist,
                    static_cast<unsigned long long>(cumulative));
    }
    out += line;
  }
  std::snprintf(line, sizeof line, "%s_sum %.9g\n%s_count %llu\n", hist, latency_sum_us / 1e6, hist,
                static_cast<unsigned long long>(cumulative));
  out += line;
  return out;
}

}  // namespace sockshare::dispatch
