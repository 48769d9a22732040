// Dispatcher protocol and loop behaviour with the worker ends in this process: a real
// dispatch::Worker, or a raw Channel playing a misbehaving worker. One thread; no sleeps
// except where a late read is the subject.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <unistd.h>

#include <cstring>
#include <fstream>
#include <set>
#include <thread>

#include "dispatch_support.hpp"
#include "sockshare/dispatch.hpp"

namespace sockshare::dispatch {
namespace {

using test::Client;
using test::pump;
using namespace std::chrono_literals;

class DispatchLoop : public test::FdLeakTest {};

std::pair<Fd, Endpoint> loopback_listener() {
  Fd fd = listen_on(parse_endpoint("127.0.0.1:0"));
  Endpoint ep = local_endpoint(fd.borrow());
  return {std::move(fd), ep};
}

std::vector<std::byte> u64(std::uint64_t v) {
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
  return out;
}

void send_hello(Channel& raw, std::uint32_t index) {
  std::byte hello[8] = {};
  hello[0] = static_cast<std::byte>(index);
  raw.send({.type = kHello, .payload = hello}, 5s);
}

// Joins a worker to `d` over a fresh channel pair; returns the worker's end, which has sent
// its hello.
Worker join_worker(Dispatcher& d, std::uint32_t index) {
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), index);
  return Worker(std::move(theirs), index);
}

// The same with the worker's end left raw, after its hello: the test speaks the protocol.
Channel join_raw_worker(Dispatcher& d, std::uint32_t index) {
  auto [ours, raw] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), index);
  send_hello(raw, index);
  return std::move(raw);
}

// A custom policy that sends everything to worker 0 whenever it is a candidate (a stuck,
// silent or misbehaving worker under test), to the first candidate otherwise.
PickFunction prefer_worker_zero() {
  return [](const ConnectionInfo&, std::span<const WorkerView> c) {
    for (std::size_t i = 0; i < c.size(); ++i) {
      if (c[i].index == 0) return i;
    }
    return std::size_t{0};
  };
}

// Serves every connection `worker` has received; returns how many.
std::size_t serve_all(Worker& worker) {
  std::vector<Connection> got;
  worker.poll(got);
  for (auto& c : got) test::serve(c, worker.index());
  return got.size();
}

TEST_F(DispatchLoop, S6_ConnectionArrivesWithMetadataAndIsAcknowledged) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);

  const auto before = std::chrono::system_clock::now();
  Client client(ep, "hello\n");
  std::vector<Connection> got;
  ASSERT_TRUE(pump(d, [&] { worker.poll(got); return !got.empty(); }));
  ASSERT_EQ(got.size(), 1u);
  const ConnectionInfo& info = got[0].info;
  EXPECT_EQ(info.listener, "web");
  EXPECT_EQ(info.peer, client.local_address());
  const auto accepted = std::chrono::system_clock::time_point(std::chrono::nanoseconds(info.accepted_at_ns));
  EXPECT_GE(accepted, before - 1s);
  EXPECT_LE(accepted, std::chrono::system_clock::now() + 1s);
  EXPECT_TRUE(info.initial_bytes.empty());
  test::serve(got[0], 0);
  got.clear();
  ASSERT_TRUE(pump(d, [&] { return client.advance() && d.stats().acknowledged == 1; }));
  EXPECT_EQ(client.field("req"), "hello");
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.accepted, 1u);
  EXPECT_EQ(s.dispatched, 1u);
  std::uint64_t histogram = 0;
  for (auto n : s.latency_counts) histogram += n;
  EXPECT_EQ(histogram, 1u);
  EXPECT_GT(s.latency_sum_us, 0.0);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_PeerAddressIsTheClientsOwnInTextForm) {
  // Octets of one, two and three digits, and a zero, in the dispatcher's hand-written IPv4
  // formatting (the whole of 127.0.0.0/8 is loopback on Linux).
  auto [listener, ep] = loopback_listener();
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);
  for (const char* source : {"127.0.0.1", "127.10.200.3", "127.255.0.99"}) {
    Client client(ep, "x\n", source);
    std::vector<Connection> got;
    ASSERT_TRUE(pump(d, [&] { worker.poll(got); return !got.empty(); }));
    EXPECT_EQ(got[0].info.peer, client.local_address());
    EXPECT_TRUE(got[0].info.peer.starts_with(std::string(source) + ":")) << got[0].info.peer;
    test::serve(got[0], 0);
    ASSERT_TRUE(pump(d, [&] { return client.advance(); }));
  }
  test::settle(d);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_ListenersOnIpv4Ipv6AndUnixStream) {
  Dispatcher d({.policy = Policy::client_hash});
  Fd v4 = listen_on(parse_endpoint("127.0.0.1:0"));
  Fd v6 = listen_on(parse_endpoint("[::1]:0"));
  const std::string path = "/tmp/sockshare-dispatch-test-" + std::to_string(::getpid()) + ".sock";
  Fd unix_listener = listen_on(parse_endpoint("unix:" + path));
  const Endpoint ep4 = local_endpoint(v4.borrow());
  const Endpoint ep6 = local_endpoint(v6.borrow());
  d.add_listener("v4", std::move(v4));
  d.add_listener("v6", std::move(v6));
  d.add_listener("local", std::move(unix_listener));
  EXPECT_THROW(d.add_listener("not-a-listener", test::make_pipe().first), Error);
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);

  std::vector<Client> clients;
  clients.emplace_back(ep4, "a\n");
  clients.emplace_back(ep6, "b\n");
  clients.emplace_back(parse_endpoint("unix:" + path), "c\n");
  ASSERT_TRUE(pump(d, [&] { serve_all(worker); return test::all_done(clients); }));
  EXPECT_EQ(clients[0].field("l"), "v4");
  EXPECT_TRUE(clients[0].field("peer").starts_with("127.0.0.1:"));
  EXPECT_EQ(clients[1].field("l"), "v6");
  EXPECT_TRUE(clients[1].field("peer").starts_with("[::1]:")) << clients[1].field("peer");
  EXPECT_EQ(clients[2].field("l"), "local");
  EXPECT_EQ(clients[2].field("peer"), "unix");
  EXPECT_EQ(clients[2].field("req"), "c");
  ::unlink(path.c_str());
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_FirstBytesTravelWithTheConnection) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.peek_bytes = 64, .peek_timeout = 150ms});
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);

  Client talker(ep, "GET /peeked HTTP/1.1\n");
  Client silent(ep, "");  // says nothing within the peek timeout
  std::vector<Connection> got;
  ASSERT_TRUE(pump(d, [&] { worker.poll(got); return got.size() == 2; }));
  const auto& first = got[0].info.initial_bytes.empty() ? got[1] : got[0];
  const auto& second = got[0].info.initial_bytes.empty() ? got[0] : got[1];
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(first.info.initial_bytes.data()),
                        first.info.initial_bytes.size()),
            "GET /peeked HTTP/1.1\n");
  EXPECT_TRUE(second.info.initial_bytes.empty());
  silent.send_more("late\n");
  // The worker reads the rest itself: nothing the dispatcher read is lost.
  test::serve(first, 0);
  test::serve(second, 0);
  got.clear();
  ASSERT_TRUE(pump(d, [&] { return talker.advance() && silent.advance(); }));
  EXPECT_EQ(talker.field("req"), "GET");  // "GET /peeked HTTP/1.1" up to the first space
  EXPECT_EQ(talker.field("first"), "21");
  EXPECT_EQ(silent.field("first"), "0");
  EXPECT_NE(silent.reply().find("req=late"), std::string::npos) << silent.reply();
  EXPECT_EQ(d.stats().peek_timeouts, 1u);
}

TEST_F(DispatchLoop, S6_CustomPolicyRoutesOnTheFirstBytes) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = [](const ConnectionInfo& info, std::span<const WorkerView> c) {
                  const std::string_view first(reinterpret_cast<const char*>(info.initial_bytes.data()),
                                               info.initial_bytes.size());
                  const std::uint32_t want = first.starts_with("GET /api") ? 1 : 0;
                  for (std::size_t i = 0; i < c.size(); ++i) {
                    if (c[i].index == want) return i;
                  }
                  return std::size_t{0};
                },
                .peek_bytes = 16,
                .peek_timeout = 2s});
  d.add_listener("web", std::move(listener));
  auto [o0, t0] = Channel::pair();
  d.add_worker(std::move(o0), ::getpid(), 0);
  Worker w0(std::move(t0), 0);
  auto [o1, t1] = Channel::pair();
  d.add_worker(std::move(o1), ::getpid(), 1);
  Worker w1(std::move(t1), 1);
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2 && d.workers()[0].ready && d.workers()[1].ready; }));

  std::vector<Client> clients;
  // Longer than peek_bytes: the worker gets 16 bytes from the dispatcher, reads the rest.
  for (int i = 0; i < 6; ++i) {
    clients.emplace_back(ep, i % 2 == 0 ? "GET /api/x?pad=0123456789\n" : "GET /static/0123456789\n");
  }
  ASSERT_TRUE(pump(d, [&] { serve_all(w0); serve_all(w1); return test::all_done(clients); }));
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(clients[static_cast<std::size_t>(i)].field("w"), i % 2 == 0 ? "1" : "0") << i;
    EXPECT_EQ(clients[static_cast<std::size_t>(i)].field("first"), "16");
  }
  // The worker saw the whole request: first bytes from the dispatcher, the rest from the socket.
  EXPECT_NE(clients[0].reply().find("req=GET /api/x?pad=0123456789\n"), std::string::npos) << clients[0].reply();
  EXPECT_NE(clients[1].reply().find("req=GET /static/0123456789\n"), std::string::npos) << clients[1].reply();
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R8_MoreThan253ForOneWorkerGoInSeveralMessages) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.max_in_flight = 1000, .accept_batch = 400});
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);
  ASSERT_TRUE(pump(d, [&] { return d.workers()[0].ready; }));
  std::vector<Client> clients;
  for (int i = 0; i < 300; ++i) clients.emplace_back(ep, "r\n");
  d.run_once(100ms);  // one round: all 300 accepted and sent to the one worker
  EXPECT_EQ(d.stats().dispatched, 300u);
  std::size_t served = 0;
  ASSERT_TRUE(pump(d, [&] { served += serve_all(worker); return served == 300; }));
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  EXPECT_EQ(d.stats().workers_lost, 0u);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R10_EveryWorkerFullStopsAcceptingUntilOneHasRoom) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.max_in_flight = 2, .ack_timeout = 60s});
  d.add_listener("web", std::move(listener));
  auto [ours, stuck] = Channel::pair();  // never read: a stuck worker
  d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(stuck, 0);

  std::vector<Client> clients;
  for (int i = 0; i < 6; ++i) clients.emplace_back(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 2; }));
  // More loop rounds change nothing: the other four wait in the kernel's backlog.
  for (int i = 0; i < 20; ++i) d.run_once(1ms);
  Stats s = d.stats();
  EXPECT_EQ(s.accepted, 2u);
  EXPECT_EQ(s.in_flight, 2u);
  EXPECT_GE(s.backpressure_pauses, 1u);

  // A worker with room appears: accepting resumes and the backlog drains into it.
  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  Worker good(std::move(theirs2), 1);
  std::size_t served = 0;
  ASSERT_TRUE(pump(d, [&] { served += serve_all(good); return served == 4 && d.stats().in_flight == 2; }));
  s = d.stats();
  EXPECT_EQ(s.accepted, 6u);  // the other two are still with the stuck one
}

TEST_F(DispatchLoop, R10_FullChannelSendsTheBatchElsewhereAndNeverBlocks) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = prefer_worker_zero(),
                .max_in_flight = 100000,
                .ack_timeout = 2500ms});
  d.add_listener("web", std::move(listener));
  auto [ours, stuck] = Channel::pair();
  // A small send buffer fills after a few batches: the dispatcher sees EAGAIN (R10).
  const int small = 4096;
  ASSERT_EQ(::setsockopt(ours.native_handle().get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(stuck, 0);
  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  Worker good(std::move(theirs2), 1);
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2 && d.workers()[1].ready; }));

  std::vector<Client> clients;
  for (int i = 0; i < 40; ++i) {
    clients.emplace_back(ep, "r\n");
    d.run_once(0ms);  // one batch per client, so the stuck channel fills message by message
  }
  std::size_t held = 0;
  // Everything the stuck worker cannot take reaches the good one without waiting.
  ASSERT_TRUE(pump(d, [&] {
    serve_all(good);
    std::size_t answered = 0;
    for (auto& c : clients) answered += c.advance() ? 1 : 0;
    held = 0;
    for (const auto& v : d.workers()) held += v.index == 0 ? v.in_flight : 0;
    return answered + held == clients.size() && held > 0;
  }, 2000ms));
  EXPECT_LT(held, clients.size());
  // Then the stuck worker misses its ack deadline: cut off, the rest re-dispatched.
  ASSERT_TRUE(pump(d, [&] { serve_all(good); return test::all_done(clients); }));
  for (auto& c : clients) EXPECT_EQ(c.field("w"), "1");
  test::settle(d);
  const Stats s = d.stats();
  // `held` may include one picked but not yet sent when the sample was taken: a connection
  // counts as re-dispatched only if it had been sent before.
  EXPECT_GE(s.redispatched + 1, held);
  EXPECT_LE(s.redispatched, held);
  EXPECT_EQ(s.workers_lost, 1u);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_LeastLoadedTieGoesToTheWorkerWithFewerConnectionsInService) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::least_loaded});
  d.add_listener("web", std::move(listener));
  Worker busy = join_worker(d, 0);
  Worker idle = join_worker(d, 1);
  busy.report_load(1);  // e.g. deep in a long request
  ASSERT_TRUE(pump(d, [&] {
    auto w = d.workers();
    return w.size() == 2 && w[0].ready && w[1].ready && w[0].reported_load == 1;
  }));
  // Two connections in one round: the first goes to the idle worker; then both totals are 1
  // (one in service against one on its way), and the tie must not go to the busy worker.
  Client a(ep, "a\n");
  Client b(ep, "b\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 2; }));
  std::vector<Connection> got_busy, got_idle;
  busy.poll(got_busy);
  idle.poll(got_idle);
  EXPECT_EQ(got_busy.size(), 0u);
  ASSERT_EQ(got_idle.size(), 2u);
  for (auto& c : got_idle) test::serve(c, 1);
  ASSERT_TRUE(pump(d, [&] { return a.advance() && b.advance(); }));
  test::expect_accounted(d);
}

// Least-loaded with every worker inside a long request (neither acks what it was sent):
// the next connection is held, in the backlog, for the first worker that catches up, instead
// of queueing behind one of the long requests. With busy_after off it goes to a busy worker.
TEST_F(DispatchLoop, S6_LeastLoadedHoldsNewConnectionsWhileEveryWorkerIsBusy) {
  for (const auto busy_after : {std::chrono::microseconds(20ms), std::chrono::microseconds(0)}) {
    SCOPED_TRACE("busy_after " + std::to_string(busy_after.count()) + " us");
    auto [listener, ep] = loopback_listener();
    Dispatcher d({.policy = Policy::least_loaded, .ack_timeout = 60s, .busy_after = busy_after});
    d.add_listener("web", std::move(listener));
    Channel raw0 = join_raw_worker(d, 0);
    Channel raw1 = join_raw_worker(d, 1);
    ASSERT_TRUE(pump(d, [&] {
      auto w = d.workers();
      return w.size() == 2 && w[0].ready && w[1].ready;
    }));

    const ReceiveOptions take{.expect = Expect::stream, .allow_unix_sockets = true};
    Client a(ep, "a\n");
    Client b(ep, "b\n");
    Message m0, m1;
    ASSERT_TRUE(pump(d, [&] { return raw0.try_receive(m0, take); }));
    ASSERT_TRUE(pump(d, [&] { return raw1.try_receive(m1, take); }));
    ASSERT_EQ(m0.fds.size(), 1u);
    ASSERT_EQ(m1.fds.size(), 1u);
    // Neither acks: both are "inside a long request" once busy_after has passed.
    const auto busy_since = std::chrono::steady_clock::now();
    pump(d, [&] { return std::chrono::steady_clock::now() - busy_since > 2 * busy_after; }, 1s);

    Client c(ep, "c\n");
    Message m;
    const bool sent_to_a_busy_worker = pump(d, [&] {
      return raw0.try_receive(m, take) || raw1.try_receive(m, take);
    }, 300ms);
    if (busy_after.count() == 0) {
      EXPECT_TRUE(sent_to_a_busy_worker);
      continue;
    }
    ASSERT_FALSE(sent_to_a_busy_worker);
    EXPECT_EQ(d.stats().accepted, 2u);  // the third waits in the kernel's backlog
    EXPECT_GE(d.stats().backpressure_pauses, 1u);

    // Worker 1 finishes its long request and acks: the held connection goes to it.
    const auto id1 = decode_connection_info(m1.fd_meta[0]).id;
    raw1.send({.type = kAck, .payload = u64(id1)}, 5s);
    ASSERT_TRUE(pump(d, [&] { return raw1.try_receive(m, take); }));
    ASSERT_EQ(m.fds.size(), 1u);
    const auto id0 = decode_connection_info(m0.fd_meta[0]).id;
    raw0.send({.type = kAck, .payload = u64(id0)}, 5s);
    raw1.send({.type = kAck, .payload = u64(decode_connection_info(m.fd_meta[0]).id)}, 5s);
    test::expect_accounted(d);
  }
}

TEST_F(DispatchLoop, S6_WorkerThatReportsBusyGetsNothingNewUntilItReportsAgain) {
  // A worker announces long work (report_load with busy) before it starts: least-loaded
  // sends it nothing from then on, and with every worker busy a connection waits in the
  // backlog for the first one that reports the end of its work.
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::least_loaded, .ack_timeout = 60s});
  d.add_listener("web", std::move(listener));
  Worker w0 = join_worker(d, 0);
  Worker w1 = join_worker(d, 1);
  auto busy_is = [&](bool b0, bool b1) {
    auto v = d.workers();
    return v.size() == 2 && v[0].ready && v[1].ready && v[0].busy == b0 && v[1].busy == b1;
  };
  w0.report_load(0, true);  // as idle as worker 1 by its count: only the flag keeps it out
  ASSERT_TRUE(pump(d, [&] { return busy_is(true, false); }));

  std::vector<Client> clients;
  std::vector<Connection> got0, got1;
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back(ep, "x\n");
    ASSERT_TRUE(pump(d, [&] { w0.poll(got0); w1.poll(got1); return got1.size() == clients.size(); }));
  }
  EXPECT_TRUE(got0.empty()) << "a connection went to the worker that said it was busy";

  w1.report_load(0, true);
  ASSERT_TRUE(pump(d, [&] { return busy_is(true, true); }));
  clients.emplace_back(ep, "held\n");
  const bool sent = pump(d, [&] { w0.poll(got0); w1.poll(got1); return !got0.empty() || got1.size() > 4; }, 300ms);
  EXPECT_FALSE(sent) << "a connection went to a busy worker";
  EXPECT_EQ(d.stats().accepted, 4u);  // the fifth waits in the kernel's backlog

  w0.report_load(0, false);  // worker 0's long work is over: the held connection is its
  ASSERT_TRUE(pump(d, [&] { w0.poll(got0); return !got0.empty(); }));
  EXPECT_EQ(got0.size(), 1u);
  w1.poll(got1);
  EXPECT_EQ(got1.size(), 4u);
  for (auto& c : got0) test::serve(c, 0);
  for (auto& c : got1) test::serve(c, 1);
  for (auto& c : clients) ASSERT_TRUE(pump(d, [&] { return c.advance(); }));
  EXPECT_EQ(clients.back().field("w"), "0");
  w1.report_load(2, true);
  ASSERT_TRUE(pump(d, [&] { return d.workers()[1].reported_load == 2 && d.workers()[1].busy; }))
      << "the flag is not part of the count";
  test::settle(d);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_WhileAWorkerIsBusyTheOthersGetOneConnectionAtATime) {
  // With long requests about, a batch sent to the one free worker could start with one and
  // leave the rest behind it: least-loaded hands out one connection per worker and the next
  // once that one is acknowledged; the rest wait in the backlog.
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::least_loaded, .ack_timeout = 60s});
  d.add_listener("web", std::move(listener));
  Channel raw0 = join_raw_worker(d, 0);
  Channel raw1 = join_raw_worker(d, 1);
  const std::uint32_t busy_bits = kLoadBusyBit;
  std::byte load[4];
  for (int i = 0; i < 4; ++i) load[i] = static_cast<std::byte>((busy_bits >> (8 * i)) & 0xFF);
  raw0.send({.type = kLoad, .payload = load}, 5s);
  ASSERT_TRUE(pump(d, [&] { auto v = d.workers(); return v.size() == 2 && v[1].ready && v[0].busy; }));

  const ReceiveOptions take{.expect = Expect::stream, .allow_unix_sockets = true};
  std::vector<Client> clients;
  for (int i = 0; i < 3; ++i) clients.emplace_back(ep, "x\n");
  Message m;
  ASSERT_TRUE(pump(d, [&] { return raw1.try_receive(m, take); }));
  EXPECT_EQ(m.fds.size(), 1u);
  Message more;
  EXPECT_FALSE(pump(d, [&] { return raw1.try_receive(more, take) || raw0.try_receive(more, take); }, 200ms))
      << "a second connection went out before the first was acknowledged";
  EXPECT_EQ(d.stats().accepted, 1u);
  for (int i = 0; i < 2; ++i) {
    raw1.send({.type = kAck, .payload = u64(decode_connection_info(m.fd_meta[0]).id)}, 5s);
    ASSERT_TRUE(pump(d, [&] { return raw1.try_receive(m, take); })) << "connection " << i + 2;
    EXPECT_EQ(m.fds.size(), 1u);
  }
  raw1.send({.type = kAck, .payload = u64(decode_connection_info(m.fd_meta[0]).id)}, 5s);
  ASSERT_TRUE(pump(d, [&] { return d.stats().acknowledged == 3; }));
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_BusyReportsDoNotChangeRoundRobin) {
  // Only least-loaded reads the flag: round robin stays a strict rotation.
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::round_robin});
  d.add_listener("web", std::move(listener));
  Worker w0 = join_worker(d, 0);
  Worker w1 = join_worker(d, 1);
  w0.report_load(0, true);
  ASSERT_TRUE(pump(d, [&] { auto v = d.workers(); return v.size() == 2 && v[0].busy && v[1].ready; }));
  std::vector<Client> clients;
  std::vector<Connection> got0, got1;
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back(ep, "x\n");
    ASSERT_TRUE(pump(d, [&] { w0.poll(got0); w1.poll(got1); return got0.size() + got1.size() == clients.size(); }));
  }
  EXPECT_EQ(got0.size(), 2u);
  EXPECT_EQ(got1.size(), 2u);
  for (auto& c : got0) test::serve(c, 0);
  for (auto& c : got1) test::serve(c, 1);
  for (auto& c : clients) ASSERT_TRUE(pump(d, [&] { return c.advance(); }));
  test::settle(d);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R12_AcksAreReadWhileConnectionsArriveAndAfterTheyStop) {
  // Acks free room while connections keep arriving (max_in_flight 2 for 12 connections needs
  // every ack), the last ones are read once arrivals stop, and a worker that goes away right
  // after a connection was sent to it gives that connection to the next worker.
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.max_in_flight = 2});
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);
  std::vector<Client> clients;
  std::size_t served = 0;
  for (int i = 0; i < 12; ++i) {
    clients.emplace_back(ep, "x\n");
    ASSERT_TRUE(pump(d, [&] { served += serve_all(worker); return served == clients.size(); }))
        << "connection " << i;
  }
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  ASSERT_TRUE(pump(d, [&] { return d.stats().in_flight == 0; }, 2s));
  EXPECT_EQ(d.stats().acknowledged, 12u);

  auto [ours2, raw] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  send_hello(raw, 1);
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 2 && d.workers()[1].ready; }));
  Client late(ep, "y\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 13; }));
  ASSERT_EQ(d.workers()[1].in_flight, 1u);  // round robin: its turn
  { Channel gone = std::move(raw); }        // closed without an ack
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 1; }, 2s));
  EXPECT_EQ(d.stats().workers_lost, 1u);
  ASSERT_TRUE(pump(d, [&] { serve_all(worker); return late.advance(); }));
  EXPECT_EQ(late.field("w"), "0");
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_HandoffLatencyEndsWhenTheAckArrivesNotWhenItIsRead) {
  // The worker acks 30 ms after the accept; the loop reads the ack 80 ms later still, as it
  // may while connections flow. The latency is the first span only. The sleeps are the
  // subject here, not waits for readiness.
  auto [listener, ep] = loopback_listener();
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  Worker worker = join_worker(d, 0);
  Client client(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 1; }));
  std::this_thread::sleep_for(30ms);
  std::vector<Connection> got;
  ASSERT_TRUE(worker.poll(got));  // acks it
  ASSERT_EQ(got.size(), 1u);
  std::this_thread::sleep_for(80ms);
  ASSERT_TRUE(pump(d, [&] { return d.stats().acknowledged == 1; }));
  const Stats s = d.stats();
  std::uint64_t samples = 0;
  for (auto n : s.latency_counts) samples += n;
  EXPECT_EQ(samples, 1u);
  EXPECT_GE(s.latency_sum_us, 30'000.0);
  EXPECT_LT(s.latency_sum_us, 80'000.0);
  test::serve(got[0], 0);
  got.clear();
  ASSERT_TRUE(pump(d, [&] { return client.advance(); }));
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_WhileConnectionsFlowAcksWaitForTheNextRoundInsteadOfWakingTheLoop) {
  // A window long enough that the two handoffs below always fall within it.
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.lazy_read_window = 400ms});
  d.add_listener("web", std::move(listener));
  Worker worker = join_worker(d, 0);
  std::vector<Client> clients;
  std::vector<Connection> got;
  for (int i = 0; i < 2; ++i) {
    clients.emplace_back(ep, "x\n");
    ASSERT_TRUE(pump(d, [&] { worker.poll(got); return got.size() == clients.size(); }));
  }
  // The second handoff came within the window: its ack (sent by poll) does not make the
  // loop's descriptor readable, and the next round reads it all the same.
  pollfd p{d.native_handle().get(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0);
  EXPECT_EQ(d.stats().in_flight, 1u);
  d.run_once(0ms);
  EXPECT_EQ(d.stats().in_flight, 0u);
  EXPECT_EQ(d.stats().acknowledged, 2u);
  // Nothing in flight, no other timer: only the window's end keeps an outside loop that waits
  // on the descriptor for next_timeout() coming back for what workers say meanwhile.
  const auto timeout = d.next_timeout();
  EXPECT_GE(timeout.count(), 0);
  EXPECT_LE(timeout, 400ms);
  // Once the window has passed without a handoff, what a worker says wakes the loop again.
  const auto quiet_from = std::chrono::steady_clock::now();
  ASSERT_TRUE(pump(d, [&] { return std::chrono::steady_clock::now() - quiet_from > 500ms; }, 2s));
  worker.report_load(1);
  EXPECT_EQ(::poll(&p, 1, 5000), 1);
  for (auto& c : got) test::serve(c, 0);
  got.clear();
  ASSERT_TRUE(pump(d, [&] { return test::all_done(clients); }));
  test::expect_accounted(d);
}

// The descriptors an epoll set watches, from /proc/self/fdinfo ("tfd: N" lines).
std::set<int> watched_by(int epoll_fd) {
  std::ifstream info("/proc/self/fdinfo/" + std::to_string(epoll_fd));
  std::set<int> out;
  for (std::string word; info >> word;) {
    if (word == "tfd:") {
      int fd = -1;
      info >> fd;
      out.insert(fd);
    }
  }
  return out;
}

bool is_epoll(int fd) {
  char target[64] = {};
  const auto n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof target - 1);
  return n > 0 && std::string_view(target, static_cast<std::size_t>(n)) == "anon_inode:[eventpoll]";
}

// A readable socket wakes its waiter synchronously, which pulls the dispatcher onto the
// client's CPU (docs/DISPATCH.md); a nested epoll set wakes it plainly. So no socket a client
// makes ready (listener, connection waiting for its first bytes) sits in the loop's own set,
// and its readiness still reaches the loop's descriptor.
TEST_F(DispatchLoop, S6_ClientSocketsWakeTheLoopThroughANestedSet) {
  auto [listener, ep] = loopback_listener();
  const int listener_fd = listener.get();
  Dispatcher d({.peek_bytes = 64, .peek_timeout = 10s});
  d.add_listener("web", std::move(listener));
  Worker worker = join_worker(d, 0);
  d.run_once(0ms);  // reads the hello, starts watching the listener

  const int loop_fd = d.native_handle().get();
  auto only_channels_and_sets = [&] {
    for (int fd : watched_by(loop_fd)) {
      if (is_epoll(fd)) continue;
      int domain = -1;
      socklen_t len = sizeof domain;
      if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain != AF_UNIX) {
        ADD_FAILURE() << "descriptor " << fd << " (domain " << domain << ") is in the loop's own set";
      }
    }
  };
  std::set<int> nested;
  for (int fd : watched_by(loop_fd)) {
    if (is_epoll(fd)) nested.merge(watched_by(fd));
  }
  EXPECT_TRUE(nested.contains(listener_fd));
  only_channels_and_sets();

  // A client that says nothing yet: accepted, then waiting for its first bytes.
  Client quiet(ep, "");
  pollfd p{loop_fd, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1) << "a connection did not make the loop readable";
  ASSERT_TRUE(pump(d, [&] { return d.stats().accepted == 1; }));
  only_channels_and_sets();
  quiet.send_more("now\n");
  std::vector<Connection> got;
  ASSERT_TRUE(pump(d, [&] { worker.poll(got); return got.size() == 1; }));
  EXPECT_EQ(got[0].info.initial_bytes.size(), 4u) << "the first bytes came through the nested set";
  test::serve(got[0], 0);
  ASSERT_TRUE(pump(d, [&] { return quiet.advance(); }));
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R12_WithNoWorkerLeftConnectionsWaitForTheNextOne) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  auto [ours, raw] = Channel::pair();
  const WorkerId first = d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(raw, 0);
  Client client(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().in_flight == 1; }));
  d.remove_worker(first);  // e.g. its process exited: nobody is left to take the connection
  for (int i = 0; i < 10; ++i) d.run_once(1ms);
  EXPECT_EQ(d.stats().pending, 1u);
  EXPECT_EQ(d.stats().dropped, 0u);
  EXPECT_FALSE(client.advance());

  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 0);  // the restarted worker
  Worker next(std::move(theirs2), 0);
  ASSERT_TRUE(pump(d, [&] { serve_all(next); return client.advance(); }));
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.redispatched, 1u);
  EXPECT_EQ(s.workers_lost, 1u);
  test::expect_accounted(d);
}

// A connection that every worker dies of (here: each closes its channel on receipt, without
// an ack) is passed on max_attempts - 1 times, then closed and counted abandoned; the next
// worker to join never sees it, and the next connection is served as usual.
TEST_F(DispatchLoop, R12_AConnectionLostWithMaxAttemptsWorkersIsClosedNotPassedOn) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.max_attempts = 2});
  d.add_listener("web", std::move(listener));
  Channel first = join_raw_worker(d, 0);
  Channel second = join_raw_worker(d, 1);
  Client poison(ep, "x\n");
  const ReceiveOptions take{.expect = Expect::anything, .allow_unix_sockets = true};
  Message m;
  // Whichever worker gets it dies; then the other one gets it and dies too.
  for (int death = 0; death < 2; ++death) {
    Channel* got = nullptr;
    ASSERT_TRUE(pump(d, [&] {
      if (first.valid() && first.try_receive(m, take)) got = &first;
      else if (second.valid() && second.try_receive(m, take)) got = &second;
      return got != nullptr;
    })) << "death " << death;
    ASSERT_EQ(m.fds.size(), 1U);
    m = Message{};         // its copy of the connection goes with it
    { Channel gone = std::move(*got); }
  }
  ASSERT_TRUE(pump(d, [&] { return poison.advance() && poison.done(); }))
      << "the connection was not closed after two lost workers";
  Stats s = d.stats();
  EXPECT_EQ(s.abandoned, 1U);
  EXPECT_EQ(s.dropped, 1U);
  EXPECT_EQ(s.redispatched, 1U);
  EXPECT_EQ(s.workers_lost, 2U);

  Worker next = join_worker(d, 2);
  Client fine(ep, "y\n");
  ASSERT_TRUE(pump(d, [&] { serve_all(next); return fine.advance(); }));
  EXPECT_EQ(fine.field("w"), "2");
  EXPECT_EQ(d.stats().abandoned, 1U);
  test::expect_accounted(d);
}

// Only the oldest unacknowledged batch can have been in a worker's hands when it died: a
// later batch still queued in its channel gets no strike and is served elsewhere as usual.
TEST_F(DispatchLoop, R12_OnlyTheOldestUnacknowledgedBatchCountsAnAttempt) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom, .custom_pick = prefer_worker_zero(), .max_attempts = 1});
  d.add_listener("web", std::move(listener));
  Channel dying = join_raw_worker(d, 0);
  Client read_by_the_dead(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 1; }));
  Client still_queued(ep, "y\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 2; }));  // a second message
  { Channel gone = std::move(dying); }  // dies with both unacknowledged
  Worker survivor = join_worker(d, 1);
  ASSERT_TRUE(pump(d, [&] { serve_all(survivor); return read_by_the_dead.advance() && still_queued.advance(); }));
  EXPECT_TRUE(read_by_the_dead.done());
  EXPECT_EQ(read_by_the_dead.reply(), "");
  EXPECT_EQ(still_queued.field("w"), "1");
  const Stats s = d.stats();
  EXPECT_EQ(s.abandoned, 1U);
  EXPECT_EQ(s.redispatched, 1U);
  test::expect_accounted(d);
}

// max_attempts = 0: no limit, the connection is passed on however many workers are lost.
TEST_F(DispatchLoop, R12_MaxAttemptsZeroPassesConnectionsOnWithoutLimit) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.max_attempts = 0});
  d.add_listener("web", std::move(listener));
  Client client(ep, "x\n");
  const ReceiveOptions take{.expect = Expect::anything, .allow_unix_sockets = true};
  for (std::uint32_t death = 0; death < 4; ++death) {
    Channel doomed = join_raw_worker(d, death);
    Message m;
    ASSERT_TRUE(pump(d, [&] { return doomed.try_receive(m, take); })) << "death " << death;
  }  // each dies holding it, unacknowledged
  Worker last = join_worker(d, 9);
  ASSERT_TRUE(pump(d, [&] { serve_all(last); return client.advance(); }));
  EXPECT_EQ(client.field("w"), "9");
  EXPECT_EQ(d.stats().abandoned, 0U);
  EXPECT_EQ(d.stats().redispatched, 4U);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R12_AckTimeoutCutsWorkerOffAndRedispatches) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = prefer_worker_zero(),
                .ack_timeout = 100ms});
  std::vector<std::pair<WorkerId, pid_t>> lost;
  d.on_worker_lost = [&](WorkerId id, pid_t pid) { lost.emplace_back(id, pid); };
  d.add_listener("web", std::move(listener));
  auto [ours, silent] = Channel::pair();
  const WorkerId silent_id = d.add_worker(std::move(ours), 4242, 0);
  send_hello(silent, 0);
  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  Worker good(std::move(theirs2), 1);

  Client client(ep, "x\n");
  std::size_t served = 0;
  ASSERT_TRUE(pump(d, [&] { served += serve_all(good); return client.advance(); }));
  EXPECT_EQ(client.field("w"), "1");
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].first, silent_id);
  EXPECT_EQ(lost[0].second, 4242);
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.redispatched, 1u);
  EXPECT_EQ(s.workers_lost, 1u);
  EXPECT_EQ(s.dispatched, 2u);
  test::expect_accounted(d);
}

// A worker that sends something malformed is cut off; whatever it held goes elsewhere.
void expect_cut_off_for(const std::function<void(Channel&, const Message&)>& misbehave) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = prefer_worker_zero()});
  d.add_listener("web", std::move(listener));
  auto [ours, bad] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(bad, 0);
  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  Worker good(std::move(theirs2), 1);

  Client client(ep, "x\n");
  Message m;
  ASSERT_TRUE(pump(d, [&] {
    return bad.try_receive(m, {.expect = Expect::stream, .allow_unix_sockets = true});
  }));
  ASSERT_EQ(m.type, kConnections);
  misbehave(bad, m);
  m.fds.clear();
  std::size_t served = 0;
  ASSERT_TRUE(pump(d, [&] { served += serve_all(good); return client.advance(); }));
  EXPECT_EQ(client.field("w"), "1");
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.worker_protocol_errors, 1u);
  EXPECT_EQ(s.workers_lost, 1u);
  EXPECT_EQ(s.redispatched, 1u);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, R13_GarbageOnTheChannelCutsTheWorkerOff) {
  expect_cut_off_for([](Channel& bad, const Message&) {
    const char garbage[] = "this is not a sockshare message at all";
    ASSERT_GT(::send(bad.native_handle().get(), garbage, sizeof garbage, MSG_NOSIGNAL), 0);
  });
}

TEST_F(DispatchLoop, R13_AckForAConnectionNotHeldCutsTheWorkerOff) {
  expect_cut_off_for([](Channel& bad, const Message&) {
    auto payload = u64(999999);
    bad.send({.type = kAck, .payload = payload}, 5s);
  });
}

TEST_F(DispatchLoop, R16_DescriptorsFromAWorkerCutItOff) {
  expect_cut_off_for([](Channel& bad, const Message& m) {
    BorrowedFd fds[] = {m.fds[0].borrow()};
    bad.send({.type = kLoad, .payload = u64(1), .fds = fds}, 5s);
  });
}

TEST_F(DispatchLoop, R13_UnknownMessageTypeCutsTheWorkerOff) {
  expect_cut_off_for([](Channel& bad, const Message&) { bad.send({.type = 0x1234}, 5s); });
}

TEST_F(DispatchLoop, R9_RejectedBatchGoesToAnotherWorker) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.policy = Policy::custom,
                .custom_pick = prefer_worker_zero()});
  d.add_listener("web", std::move(listener));
  auto [ours, raw] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(raw, 0);
  auto [ours2, theirs2] = Channel::pair();
  d.add_worker(std::move(ours2), ::getpid(), 1);
  Worker good(std::move(theirs2), 1);

  Client client(ep, "x\n");
  Message m;
  ASSERT_TRUE(pump(d, [&] { return raw.try_receive(m, {.expect = Expect::stream}); }));
  // As if the descriptors had been lost at RLIMIT_NOFILE: drop them, name the batch.
  m.fds.clear();
  raw.send({.type = kReject, .payload = u64(m.seq)}, 5s);
  std::size_t served = 0;
  ASSERT_TRUE(pump(d, [&] { served += serve_all(good); return client.advance(); }));
  EXPECT_EQ(client.field("w"), "1");
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.rejected_batches, 1u);
  EXPECT_EQ(s.redispatched, 1u);
  EXPECT_EQ(s.workers_lost, 0u);  // a reject is not misbehaviour
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_DrainFinishesWhenWorkersAcknowledgeAndSayBye) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d;
  d.add_listener("web", std::move(listener));
  auto [ours, theirs] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  Worker worker(std::move(theirs), 0);
  Client client(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 1; }));
  d.drain(5s);
  std::vector<Connection> got;
  bool more = true;
  ASSERT_TRUE(pump(d, [&] {
    if (more) more = worker.poll(got);
    return d.drained();
  }));
  EXPECT_FALSE(more);
  EXPECT_TRUE(worker.draining());
  ASSERT_EQ(got.size(), 1u);
  test::serve(got[0], 0);
  EXPECT_TRUE(client.advance());
  // The listener is closed: new clients are refused.
  EXPECT_THROW((void)connect_to(ep), Error);
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.dropped, 0u);
  test::expect_accounted(d);
}

// A reload retires one worker while the dispatcher goes on serving: nothing new goes to it,
// it still serves what was already sent to it, says bye and leaves without counting as lost.
TEST_F(DispatchLoop, S6_DrainedWorkerGetsNothingNewAndServesWhatItWasSent) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d;  // round robin: without the drain every other connection would go to worker 0
  int lost_calls = 0;
  d.on_worker_lost = [&](WorkerId, pid_t) { ++lost_calls; };
  d.add_listener("web", std::move(listener));
  auto [ours0, theirs0] = Channel::pair();
  auto [ours1, theirs1] = Channel::pair();
  const WorkerId first = d.add_worker(std::move(ours0), ::getpid(), 0);
  d.add_worker(std::move(ours1), ::getpid(), 1);
  Worker retiring(std::move(theirs0), 0);
  Worker staying(std::move(theirs1), 1);
  ASSERT_TRUE(pump(d, [&] {
    auto w = d.workers();
    return w.size() == 2 && w[0].ready && w[1].ready;
  }));

  Client before(ep, "a\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 1; }));
  ASSERT_EQ(d.workers()[0].in_flight, 1u);  // sent to worker 0, not taken yet
  d.drain_worker(first, 5s);

  std::vector<Client> after;
  for (int i = 0; i < 6; ++i) after.emplace_back(ep, "b\n");
  ASSERT_TRUE(pump(d, [&] { serve_all(staying); return test::all_done(after); }));
  for (auto& c : after) EXPECT_EQ(c.field("w"), "1");

  std::vector<Connection> got;
  EXPECT_FALSE(retiring.poll(got)) << "the drain message did not arrive";
  ASSERT_EQ(got.size(), 1u);
  test::serve(got[0], 0);
  got.clear();
  ASSERT_TRUE(pump(d, [&] { return before.advance(); }));
  EXPECT_EQ(before.field("w"), "0");
  { Worker gone = std::move(retiring); }  // exits after its bye
  ASSERT_TRUE(pump(d, [&] { return d.workers().size() == 1; }));
  EXPECT_EQ(lost_calls, 0);
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.redispatched, 0u);
  EXPECT_EQ(s.dropped, 0u);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_DrainDeadlineDropsWhatWasNeverAcknowledged) {
  auto [listener, ep] = loopback_listener();
  Dispatcher d({.ack_timeout = 60s});
  d.add_listener("web", std::move(listener));
  auto [ours, silent] = Channel::pair();
  d.add_worker(std::move(ours), ::getpid(), 0);
  send_hello(silent, 0);
  Client client(ep, "x\n");
  ASSERT_TRUE(pump(d, [&] { return d.stats().dispatched == 1; }));
  const auto start = std::chrono::steady_clock::now();
  d.drain(150ms);
  ASSERT_TRUE(pump(d, [&] { return d.drained(); }, 5s));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 140ms);
  test::settle(d);
  const Stats s = d.stats();
  EXPECT_EQ(s.dropped, 1u);
  test::expect_accounted(d);
}

TEST_F(DispatchLoop, S6_StopAndWatchShareTheLoop) {
  Dispatcher d;
  auto [r, w] = test::make_pipe();
  int calls = 0;
  d.watch(r.borrow(), EPOLLIN, [&](std::uint32_t events) {
    EXPECT_TRUE(events & EPOLLIN);
    char c;
    ASSERT_EQ(::read(r.get(), &c, 1), 1);
    ++calls;
    d.stop();
  });
  ASSERT_EQ(::write(w.get(), "x", 1), 1);
  d.run();  // returns because the callback called stop()
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(d.stopped());
  d.unwatch(r.borrow());
}

TEST_F(DispatchLoop, R13_WorkerSeesDispatcherGoneAsEndOfService) {
  auto [ours, theirs] = Channel::pair();
  Worker worker(std::move(theirs), 3);
  { Channel closing = std::move(ours); }
  std::vector<Connection> got;
  EXPECT_FALSE(worker.poll(got));
  worker.report_load(5);  // no SIGPIPE, no throw: the peer is simply gone
}

}  // namespace
}  // namespace sockshare::dispatch
