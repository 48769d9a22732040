// Generation handoff between real processes: the holder and its successors are this test
// binary re-executed as the helper `handoff_holder`; they report over the readiness pipe, so
// nothing here sleeps. Clients are real loopback TCP (port 0) and unix stream connections.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <condition_variable>
#include <map>
#include <mutex>
#include <sstream>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "sockshare/handoff.hpp"
#include "support/harness.hpp"

namespace sockshare {
namespace {

using namespace std::chrono_literals;
using handoff::HandoffClient;
using handoff::HandoffServer;
using test::Child;

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

std::map<std::string, std::string> fields(const std::string& line) {
  std::map<std::string, std::string> out;
  std::istringstream in(line);
  std::string word;
  while (in >> word) {
    const auto eq = word.find('=');
    if (eq == std::string::npos) continue;
    std::string key = word.substr(0, eq);
    std::string value = word.substr(eq + 1);
    if (key == "detail") {
      std::string rest;
      std::getline(in, rest);
      out[key] = value + rest;
      break;
    }
    out[key] = value;
  }
  return out;
}

// A private (0700) directory for socket files, removed with its contents.
struct TempDir {
  std::string path;
  TempDir() {
    char pattern[] = "/tmp/sockshare-handoff-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = pattern;
  }
  ~TempDir() {
    if (DIR* dir = ::opendir(path.c_str())) {
      while (dirent* e = ::readdir(dir)) {
        if (e->d_name[0] != '.') ::unlink((path + "/" + e->d_name).c_str());
      }
      ::closedir(dir);
    }
    ::rmdir(path.c_str());
  }
  [[nodiscard]] std::string file(const std::string& name) const { return path + "/" + name; }
};

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// Replies "gen <g>\n" on every connection it accepts and closes it; after a handoff it has
// nothing left to serve (each connection is answered at once), so the accepted ones are
// never lost.
void answer_all(int listener, int generation) {
  const std::string reply = "gen " + std::to_string(generation) + "\n";
  for (;;) {
    Fd conn(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) return;  // EAGAIN: the queue is empty (the listener is non-blocking)
    set_nonblocking(conn.borrow(), false);
    (void)::send(conn.get(), reply.data(), reply.size(), MSG_NOSIGNAL);
  }
}

// One generation of a server. Arguments: control endpoint, generation number, then options:
//   no-accept      never accept client connections (they queue in the backlog)
//   linger         after handing over, stay alive until fd 3 (a pipe) reaches EOF
//   timeout=MS     the holder's exchange timeout
//   expect-pid=N   only process N may take over
//   unix=PATH      generation 0 also listens on unix:PATH ("local")
// Generation 0 opens the listeners; generation N takes them from the control address.
// Reports "port=... gen=... cookie=..." when serving, then one "outcome=..." line per
// handoff attempt.
SOCKSHARE_HELPER(handoff_holder) {
  const auto& args = ctx.args();
  const Endpoint control = parse_endpoint(args.at(0));
  const int generation = std::stoi(args.at(1));
  bool accept_clients = true;
  bool linger = false;
  std::string unix_path;
  handoff::HandoffServerOptions options;
  for (std::size_t i = 2; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "no-accept") accept_clients = false;
    else if (a == "linger") linger = true;
    else if (a.starts_with("timeout=")) options.exchange_timeout = std::chrono::milliseconds(std::stoi(a.substr(8)));
    else if (a.starts_with("expect-pid=")) options.taker.pid = std::stoi(a.substr(11));
    else if (a.starts_with("unix=")) unix_path = a.substr(5);
  }
  bool stop = false;
  options.on_handed_over = [&] { stop = true; };

  Fd own_web;
  Fd own_local;
  handoff::Takeover takeover;
  HandoffServer server;
  if (generation == 0) {
    own_web = listen_on(parse_endpoint("127.0.0.1:0"));
    server = HandoffServer::listen(control, options);
    server.add("web", own_web.borrow());
    if (!unix_path.empty()) {
      own_local = listen_on(parse_endpoint("unix:" + unix_path));
      server.add("local", own_local.borrow());
    }
  } else {
    takeover = handoff::take_listeners(control);
    server = HandoffServer::adopt(std::move(takeover.control), options);
    for (auto& l : takeover.listeners) server.add(l.meta.name, l.fd.borrow());
  }
  BorrowedFd web = own_web.borrow();
  BorrowedFd local = own_local.borrow();
  for (auto& l : takeover.listeners) {
    if (l.meta.name == "web") web = l.fd.borrow();
    if (l.meta.name == "local") local = l.fd.borrow();
  }
  ctx.ready("port=" + std::to_string(local_endpoint(web).port) + " gen=" + std::to_string(generation) +
            " cookie=" + std::to_string(identify(web).cookie) +
            " released=" + std::to_string(generation == 0 || takeover.released) +
            " holder=" + std::to_string(takeover.holder_pid));

  const auto give_up = std::chrono::steady_clock::now() + 60s;
  while (!stop && std::chrono::steady_clock::now() < give_up) {
    std::vector<pollfd> fds{{server.native_handle().get(), POLLIN, 0}};
    if (accept_clients) {
      fds.push_back({web.get(), POLLIN, 0});
      if (local.valid()) fds.push_back({local.get(), POLLIN, 0});
    }
    if (::poll(fds.data(), fds.size(), 1000) <= 0) continue;
    // Clients first: what is accepted is answered before a handoff can stop this loop.
    for (std::size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0) answer_all(fds[i].fd, generation);
    }
    if (fds[0].revents != 0) {
      auto outcome = server.serve(0ms);
      if (outcome.result == handoff::ServeResult::idle) continue;
      std::string result(handoff::to_string(outcome.result));
      for (char& c : result) c = c == ' ' ? '_' : c;
      ctx.ready("outcome=" + result + " concurrent=" + std::to_string(outcome.concurrent_refused) +
                " taker=" + std::to_string(outcome.taker_pid) +
                " sent=" + std::to_string(outcome.descriptors_sent) + " detail=" + outcome.detail);
    }
  }
  if (!stop) return 5;
  if (linger) {
    // Stands for a generation still draining long connections.
    pollfd p{3, POLLIN, 0};
    ::poll(&p, 1, 30000);
  }
  return 0;
}

// Takes the listeners and dies without acknowledging.
SOCKSHARE_HELPER(handoff_taker_dies) {
  auto client = HandoffClient::connect(parse_endpoint(ctx.args().at(0)));
  auto takeover = client.receive();
  ctx.ready("received=" + std::to_string(takeover.listeners.size()));
  std::_Exit(3);  // no destructor: no abort message, just a dead process
}

// Takes the listeners and never acknowledges.
SOCKSHARE_HELPER(handoff_taker_stalls) {
  auto client = HandoffClient::connect(parse_endpoint(ctx.args().at(0)));
  auto takeover = client.receive();
  ctx.ready("received=" + std::to_string(takeover.listeners.size()));
  ::poll(nullptr, 0, 30000);
  return 0;
}

Child spawn_holder(const std::string& control, int generation, std::vector<std::string> extra = {},
                   std::vector<BorrowedFd> inherit = {}) {
  test::SpawnOptions options;
  options.args = {control, std::to_string(generation)};
  options.args.insert(options.args.end(), extra.begin(), extra.end());
  options.inherit = std::move(inherit);
  return Child::helper("handoff_holder", std::move(options));
}

// Connects, reads the whole answer. "<refused>", "<reset>" or "<error ...>" on failure.
std::string ask(const Endpoint& ep) {
  try {
    Fd fd = connect_to(ep);
    timeval tv{5, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string out;
    char buffer[64];
    for (;;) {
      const ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
      if (n == 0) break;
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == ECONNRESET ? "<reset>" : "<error " + errno_name(errno) + ">";
      }
      out.append(buffer, static_cast<std::size_t>(n));
    }
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  } catch (const Error& e) {
    if (e.code() == ECONNREFUSED) return "<refused>";
    if (e.code() == ECONNRESET) return "<reset>";
    return std::string("<error ") + e.what() + ">";
  }
}

Endpoint loopback(const std::string& port) { return parse_endpoint("127.0.0.1:" + port); }

class HandoffProcess : public test::FdLeakTest {};

TEST_F(HandoffProcess, HappyPathSameListenerAcrossGenerations) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  Child gen0 = spawn_holder(control, 0);
  auto ready0 = fields(gen0.wait_ready());
  const Endpoint ep = loopback(ready0["port"]);
  EXPECT_EQ(ask(ep), "gen 0");

  Child gen1 = spawn_holder(control, 1);
  auto ready1 = fields(gen1.wait_ready());
  EXPECT_EQ(ready1["port"], ready0["port"]);
  EXPECT_EQ(ready1["cookie"], ready0["cookie"]);  // the very same socket, not a rebind
  EXPECT_EQ(ready1["released"], "1");
  EXPECT_EQ(ready1["holder"], std::to_string(gen0.pid()));
  auto outcome = fields(gen0.wait_ready());
  EXPECT_EQ(outcome["outcome"], "handed_over") << outcome["detail"];
  EXPECT_EQ(outcome["taker"], std::to_string(gen1.pid()));
  EXPECT_EQ(outcome["sent"], "2");  // "web" and the control listener
  EXPECT_EQ(gen0.wait_exit(), 0);
  EXPECT_EQ(ask(ep), "gen 1");
}

TEST_F(HandoffProcess, R22_QueuedConnectionsServedByTheNewGeneration) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  Child gen0 = spawn_holder(control, 0, {"no-accept"});
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);
  // Twenty connections complete their handshake into gen 0's accept queue; nobody accepts.
  std::vector<Fd> queued;
  for (int i = 0; i < 20; ++i) queued.push_back(connect_to(ep));

  Child gen1 = spawn_holder(control, 1);
  gen1.wait_ready();
  EXPECT_EQ(fields(gen0.wait_ready())["outcome"], "handed_over");
  EXPECT_EQ(gen0.wait_exit(), 0);
  int served = 0;
  for (auto& fd : queued) {
    pollfd p{fd.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1);
    char buffer[16] = {};
    const ssize_t n = ::read(fd.get(), buffer, sizeof buffer - 1);
    if (n > 0 && std::string(buffer) == "gen 1\n") ++served;
  }
  EXPECT_EQ(served, 20);
}

// A client storm across five handoffs 0 -> 1 -> ... -> 5: every connection must be answered,
// none refused, none reset (R22). Each successor is started as soon as the previous one is
// serving, without waiting for the old generation to exit.
TEST_F(HandoffProcess, R22_ConnectStormAcrossReloads) {
  constexpr int kGenerations = 6;
  constexpr int kClients = 2;
  constexpr int kMaxConnections = 20000;
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  std::vector<Child> gens;
  gens.push_back(spawn_holder(control, 0));
  const Endpoint ep = loopback(fields(gens[0].wait_ready())["port"]);

  std::mutex mutex;
  std::condition_variable progress;
  std::map<std::string, int> answers;  // answer text -> count
  int done = 0;
  std::atomic<bool> stop{false};
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  auto client = [&] {
    while (!stop && std::chrono::steady_clock::now() < deadline) {
      std::string answer = ask(ep);
      std::lock_guard lock(mutex);
      ++answers[answer];
      if (++done >= kMaxConnections) stop = true;
      progress.notify_all();
    }
  };
  // Waits until the clients completed `more` further connections (bounded).
  auto wait_progress = [&](int more) {
    std::unique_lock lock(mutex);
    const int target = done + more;
    return progress.wait_for(lock, 10s, [&] { return done >= target || stop; });
  };
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) clients.emplace_back(client);

  // ~400 connections per generation, about 2400 in all: enough that handoffs land while
  // connections are in flight and queued, small enough to stay well under a second or two.
  EXPECT_TRUE(wait_progress(400));
  for (int g = 1; g < kGenerations; ++g) {
    gens.push_back(spawn_holder(control, g));
    EXPECT_EQ(fields(gens[g].wait_ready())["gen"], std::to_string(g));
    auto outcome = fields(gens[g - 1].wait_ready());
    EXPECT_EQ(outcome["outcome"], "handed_over") << "generation " << g - 1 << ": " << outcome["detail"];
    EXPECT_TRUE(wait_progress(400)) << "no progress after handoff to generation " << g;
  }
  stop = true;
  for (auto& t : clients) t.join();
  for (int g = 0; g + 1 < kGenerations; ++g) EXPECT_EQ(gens[g].wait_exit(), 0) << "generation " << g;

  int answered = 0;
  std::string failures;
  for (const auto& [text, count] : answers) {
    if (text.starts_with("gen ")) {
      answered += count;
    } else {
      failures += " " + text + " x" + std::to_string(count);
    }
  }
  EXPECT_EQ(answers["<refused>"], 0);
  EXPECT_EQ(answers["<reset>"], 0);
  EXPECT_EQ(answered, done) << "unanswered connections:" << failures;
  for (int g = 0; g < kGenerations; ++g) {
    EXPECT_GT(answers["gen " + std::to_string(g)], 0) << "generation " << g << " served nothing";
  }
  RecordProperty("connections", done);
  std::printf("storm: %d connections across %d handoffs, all answered\n", done, kGenerations - 1);
}

TEST_F(HandoffProcess, FailedHandoffTakerDiesBeforeAckOldKeepsServing) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  Child gen0 = spawn_holder(control, 0);
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);

  Child taker = Child::helper("handoff_taker_dies", {.args = {control}});
  EXPECT_EQ(taker.wait_ready(), "received=1");
  EXPECT_EQ(taker.wait_exit(), 3);
  auto outcome = fields(gen0.wait_ready());
  EXPECT_EQ(outcome["outcome"], "failed");
  // The taker read everything and died: an orderly close, or a reset if it died with
  // something of ours unread.
  EXPECT_TRUE(contains(outcome["detail"], "closed") || contains(outcome["detail"], "ECONNRESET"))
      << outcome["detail"];
  EXPECT_EQ(ask(ep), "gen 0");  // haproxy #1883: the old generation keeps serving

  // And the next attempt succeeds.
  Child gen1 = spawn_holder(control, 1);
  gen1.wait_ready();
  EXPECT_EQ(fields(gen0.wait_ready())["outcome"], "handed_over");
  EXPECT_EQ(ask(ep), "gen 1");
}

TEST_F(HandoffProcess, FailedHandoffTakerNeverAcksTimesOut) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  Child gen0 = spawn_holder(control, 0, {"timeout=300"});
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);
  Child taker = Child::helper("handoff_taker_stalls", {.args = {control}});
  EXPECT_EQ(taker.wait_ready(), "received=1");
  auto outcome = fields(gen0.wait_ready());
  EXPECT_EQ(outcome["outcome"], "failed");
  EXPECT_TRUE(contains(outcome["detail"], "did not acknowledge")) << outcome["detail"];
  EXPECT_EQ(ask(ep), "gen 0");
}

TEST_F(HandoffProcess, ConcurrentTakerRefusedWhileOneIsInProgress) {
  TempDir dir;
  const Endpoint control = parse_endpoint("unix:" + dir.file("control"));
  Child gen0 = spawn_holder(control.to_string(), 0);
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);

  HandoffClient first = HandoffClient::connect(control);
  handoff::Takeover taken = first.receive();
  ASSERT_EQ(taken.listeners.size(), 1u);
  HandoffClient second = HandoffClient::connect(control);
  try {
    (void)second.receive();
    ADD_FAILURE() << "a second taker got the listeners during a handoff";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::refused);
    EXPECT_TRUE(contains(e.what(), "busy")) << e.what();
    EXPECT_TRUE(contains(e.what(), "one upgrade at a time")) << e.what();
  }
  EXPECT_TRUE(first.commit());
  auto outcome = fields(gen0.wait_ready());
  EXPECT_EQ(outcome["outcome"], "handed_over");
  EXPECT_EQ(outcome["concurrent"], "1");
  EXPECT_EQ(gen0.wait_exit(), 0);

  // This process owns the listener now: a client waits in its queue until we accept.
  Fd client = connect_to(ep);
  Fd accepted(::accept4(taken.listeners[0].fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
  EXPECT_TRUE(accepted.valid());
  EXPECT_NE(::fcntl(taken.listeners[0].fd.get(), F_GETFD) & FD_CLOEXEC, 0);
}

TEST_F(HandoffProcess, IdentityChecksBothWays) {
  TempDir dir;
  const Endpoint control = parse_endpoint("unix:" + dir.file("control"));
  // The holder accepts only pid 1, which we are not.
  Child gen0 = spawn_holder(control.to_string(), 0, {"expect-pid=1"});
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);
  try {
    (void)handoff::take_listeners(control);
    ADD_FAILURE() << "an unexpected taker got the listeners";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::refused);
    EXPECT_TRUE(contains(e.what(), "expected pid 1")) << e.what();
  }
  EXPECT_EQ(fields(gen0.wait_ready())["outcome"], "refused");
  EXPECT_EQ(ask(ep), "gen 0");

  // The taker checks the holder: a wrong pid is refused before anything is received...
  const Endpoint open_control = parse_endpoint("unix:" + dir.file("open-control"));
  Child open_holder = spawn_holder(open_control.to_string(), 0);
  const Endpoint open_ep = loopback(fields(open_holder.wait_ready())["port"]);
  handoff::TakeOptions wrong;
  wrong.holder.pid = ::getpid();
  try {
    (void)HandoffClient::connect(open_control, wrong);
    ADD_FAILURE() << "connected to a holder that is not the expected process";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::refused);
    EXPECT_TRUE(contains(e.what(), "expected pid " + std::to_string(::getpid()))) << e.what();
  }
  EXPECT_EQ(fields(open_holder.wait_ready())["outcome"], "failed");  // the taker hung up
  // ...and the right pidfd passes (pidfs inode comparison where the kernel has it).
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, open_holder.pid(), 0)));
  ASSERT_TRUE(pidfd.valid());
  handoff::TakeOptions right;
  right.holder.pid = open_holder.pid();
  right.holder.pidfd = pidfd.borrow();
  HandoffClient client = HandoffClient::connect(open_control, right);
  EXPECT_EQ(client.holder_pid(), open_holder.pid());
  client.abort("only checking identity");
  auto aborted = fields(open_holder.wait_ready());
  EXPECT_EQ(aborted["outcome"], "failed");
  EXPECT_TRUE(contains(aborted["detail"], "only checking identity")) << aborted["detail"];
  EXPECT_EQ(ask(open_ep), "gen 0");
  // A pidfd of another process is refused even with no pid given.
  Fd other(static_cast<int>(::syscall(SYS_pidfd_open, gen0.pid(), 0)));
  handoff::TakeOptions other_pidfd;
  other_pidfd.holder.pidfd = other.borrow();
  EXPECT_THROW((void)HandoffClient::connect(open_control, other_pidfd), Error);
  EXPECT_EQ(fields(open_holder.wait_ready())["outcome"], "failed");
}

TEST_F(HandoffProcess, UnixPathNotUnlinkedByOldGenerationAfterHandoff) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  const std::string sock = dir.file("app.sock");
  const Endpoint local = parse_endpoint("unix:" + sock);
  Child gen0 = spawn_holder(control, 0, {"unix=" + sock});
  gen0.wait_ready();
  EXPECT_EQ(ask(local), "gen 0");

  Child gen1 = spawn_holder(control, 1);
  gen1.wait_ready();
  EXPECT_EQ(fields(gen0.wait_ready())["outcome"], "handed_over");
  EXPECT_EQ(gen0.wait_exit(), 0);  // its HandoffServer and listeners are gone now
  EXPECT_TRUE(path_exists(sock));
  EXPECT_TRUE(path_exists(dir.file("control")));
  EXPECT_EQ(ask(local), "gen 1");

  // The successor serves the next handoff at the same control path, and the next taker
  // sees the successor's identity there, not that of the generation that created it.
  Child gen2 = spawn_holder(control, 2);
  EXPECT_EQ(fields(gen2.wait_ready())["holder"], std::to_string(gen1.pid()));
  EXPECT_EQ(fields(gen1.wait_ready())["outcome"], "handed_over");
  EXPECT_EQ(ask(local), "gen 2");
}

// tableflip #52: an upgrade must not wait for the previous old generation to finish draining.
TEST_F(HandoffProcess, BackToBackHandoffWhileOldGenerationStillDrains) {
  TempDir dir;
  const std::string control = "unix:" + dir.file("control");
  auto [drain_read, drain_write] = test::make_pipe();
  Child gen0 = spawn_holder(control, 0, {"linger"}, {drain_read.borrow()});
  drain_read.reset();
  const Endpoint ep = loopback(fields(gen0.wait_ready())["port"]);
  Child gen1 = spawn_holder(control, 1);
  gen1.wait_ready();
  EXPECT_EQ(fields(gen0.wait_ready())["outcome"], "handed_over");
  EXPECT_TRUE(gen0.running());  // still draining

  Child gen2 = spawn_holder(control, 2);
  gen2.wait_ready();
  EXPECT_EQ(fields(gen1.wait_ready())["outcome"], "handed_over");
  EXPECT_EQ(gen1.wait_exit(), 0);
  EXPECT_EQ(ask(ep), "gen 2");
  EXPECT_TRUE(gen0.running());
  drain_write.reset();
  EXPECT_EQ(gen0.wait_exit(), 0);
}

// ---- in-process: path hygiene and the control directory ----

class HandoffPaths : public test::FdLeakTest {};

TEST_F(HandoffPaths, RemovesOnlyItsOwnFilesWhenNeverHandedOver) {
  TempDir dir;
  {
    HandoffServer server = HandoffServer::listen(parse_endpoint("unix:" + dir.file("control")));
    Fd a = listen_on(parse_endpoint("unix:" + dir.file("a.sock")));
    Fd b = listen_on(parse_endpoint("unix:" + dir.file("b.sock")));
    server.add("a", a.borrow());
    server.add("b", b.borrow());
    // Someone else puts a new socket at b's path: that file is not ours to remove.
    ::unlink(dir.file("b.sock").c_str());
    Fd replacement = listen_on(parse_endpoint("unix:" + dir.file("b.sock")));
    EXPECT_TRUE(path_exists(dir.file("control")));
  }
  EXPECT_FALSE(path_exists(dir.file("control")));
  EXPECT_FALSE(path_exists(dir.file("a.sock")));
  EXPECT_TRUE(path_exists(dir.file("b.sock")));
}

TEST_F(HandoffPaths, ControlPathMustBeInAPrivateDirectory) {
  TempDir dir;
  ::chmod(dir.path.c_str(), 0755);
  try {
    (void)HandoffServer::listen(parse_endpoint("unix:" + dir.file("control")));
    ADD_FAILURE() << "control socket created in a directory others can enter";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::refused);
    EXPECT_TRUE(contains(e.what(), "0755")) << e.what();
  }
  handoff::HandoffServerOptions relaxed;
  relaxed.require_private_directory = false;
  HandoffServer server = HandoffServer::listen(parse_endpoint("unix:" + dir.file("control")), relaxed);
  EXPECT_TRUE(server.native_handle().valid());
}

TEST_F(HandoffPaths, RegistryRejectsBadEntries) {
  const std::string name = "@sockshare-handoff-registry-" + std::to_string(::getpid());
  HandoffServer server = HandoffServer::listen(parse_endpoint("unix:" + name));
  Fd listener = listen_on(parse_endpoint("127.0.0.1:0"));
  server.add("web", listener.borrow());
  EXPECT_THROW(server.add("web", listener.borrow()), Error);  // duplicate name
  EXPECT_THROW(server.add("bad:name", listener.borrow()), Error);
  auto [r, w] = test::make_pipe();
  EXPECT_THROW(server.add("pipe", r.borrow()), Error);  // not a socket
  Fd client = connect_to(local_endpoint(listener.borrow()));
  EXPECT_THROW(server.add("conn", client.borrow()), Error);  // not listening
  EXPECT_EQ(server.size(), 1u);
  EXPECT_EQ(server.serve(0ms).result, handoff::ServeResult::idle);
}

// ---- in-process: batching and validation, holder and taker on two threads ----

class HandoffInProcess : public test::FdLeakTest {
protected:
  Endpoint unique_control(const std::string& what) {
    return parse_endpoint("unix:@sockshare-handoff-" + what + "-" + std::to_string(::getpid()));
  }
};

TEST_F(HandoffInProcess, R8_MoreThan253ListenersTravelInBatches) {
  constexpr std::size_t kListeners = 300;  // + the control listener: 253 + 48
  std::vector<Fd> listeners;
  std::vector<std::uint64_t> cookies;
  const Endpoint control = unique_control("batches");
  HandoffServer server = HandoffServer::listen(control);
  for (std::size_t i = 0; i < kListeners; ++i) {
    listeners.push_back(listen_on(parse_endpoint("127.0.0.1:0"), {.backlog = 4}));
    cookies.push_back(identify(listeners.back().borrow()).cookie);
    server.add("l" + std::to_string(i), listeners.back().borrow());
  }
  handoff::ServeOutcome outcome;
  std::thread holder([&] { outcome = server.serve(10s); });
  handoff::Takeover taken = handoff::take_listeners(control);
  holder.join();
  EXPECT_EQ(outcome.result, handoff::ServeResult::handed_over) << outcome.detail;
  EXPECT_EQ(outcome.descriptors_sent, kListeners + 1);
  EXPECT_TRUE(taken.released);
  EXPECT_TRUE(taken.control.valid());
  ASSERT_EQ(taken.listeners.size(), kListeners);
  for (std::size_t i = 0; i < kListeners; ++i) {
    EXPECT_EQ(taken.listeners[i].meta.name, "l" + std::to_string(i));
    EXPECT_EQ(taken.listeners[i].identity.cookie, cookies[i]);
    EXPECT_EQ(taken.listeners[i].meta.endpoint,
              local_endpoint(listeners[i].borrow()).to_string());
  }
  EXPECT_TRUE(server.handed_over());
  EXPECT_THROW((void)server.serve(0ms), Error);  // the successor serves the next one
}

// A holder whose metadata does not describe what it sends: the taker refuses the set,
// tells the holder why, and throws (R15).
TEST_F(HandoffInProcess, R15_TakerRejectsDescriptorsThatContradictTheirMetadata) {
  const Endpoint control = unique_control("liar");
  auto listener = ChannelListener::listen(control);
  Fd tcp = listen_on(parse_endpoint("127.0.0.1:0"));
  Fd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  auto [pipe_read, pipe_write] = test::make_pipe();
  const SocketIdentity tcp_id = identify(tcp.borrow());

  struct Lie {
    BorrowedFd fd;
    std::uint64_t cookie;
    const char* expected;
  };
  const Lie lies[] = {
      {pipe_read.borrow(), tcp_id.cookie, "not a socket"},
      {udp.borrow(), tcp_id.cookie, "is a udp4"},
      {tcp.borrow(), tcp_id.cookie + 1, "cookie differs"},
  };
  for (const auto& lie : lies) {
    std::string abort_text;
    std::thread fake_holder([&] {
      Channel taker = listener.accept(10s);
      Message hello = taker.receive({}, 10s);
      handoff::ListenerMeta meta;
      meta.name = "web";
      meta.endpoint = "127.0.0.1:1";
      meta.family = tcp_id.family;
      meta.type = tcp_id.type;
      meta.protocol = tcp_id.protocol;
      meta.cookie = lie.cookie;
      const auto entry = handoff::encode_meta(meta);
      const std::span<const std::byte> metas[] = {entry};
      const BorrowedFd fds[] = {lie.fd};
      const auto payload = handoff::encode(handoff::Batch{0, 1});
      taker.send({.type = handoff::kTypeListeners, .payload = payload, .fds = fds, .fd_meta = metas}, 10s);
      Message answer = taker.receive({}, 10s);
      handoff::Refusal refusal;
      if (answer.type == handoff::kTypeAbort && handoff::decode(answer.payload, refusal).ok) {
        abort_text = refusal.text;
      }
    });
    try {
      (void)handoff::take_listeners(control);
      ADD_FAILURE() << "accepted a descriptor that is not what its metadata says";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::protocol);
      EXPECT_TRUE(contains(e.what(), lie.expected)) << e.what();
    }
    fake_holder.join();
    EXPECT_TRUE(contains(abort_text, lie.expected)) << abort_text;
  }
}

// A taker that speaks out of turn fails its own handoff, not the holder.
TEST_F(HandoffInProcess, GarbageFromTakerLeavesHolderServing) {
  const Endpoint control = unique_control("garbage");
  HandoffServer server = HandoffServer::listen(control);
  Fd web = listen_on(parse_endpoint("127.0.0.1:0"));
  server.add("web", web.borrow());
  handoff::ServeOutcome outcome;
  std::thread holder([&] { outcome = server.serve(10s); });
  Channel rogue = Channel::connect(control, 10s);
  const auto ack = handoff::encode(handoff::Ack{1});
  rogue.send({.type = handoff::kTypeAck, .payload = ack}, 10s);
  Message answer = rogue.receive({}, 10s);
  holder.join();
  EXPECT_EQ(answer.type, handoff::kTypeRefused);
  EXPECT_EQ(outcome.result, handoff::ServeResult::failed);
  EXPECT_TRUE(contains(outcome.detail, "expected hello")) << outcome.detail;
  EXPECT_FALSE(server.handed_over());

  // Wrong version: refused, still not handed over, and a proper taker succeeds afterwards.
  std::thread holder2([&] { outcome = server.serve(10s); });
  Channel old_taker = Channel::connect(control, 10s);
  const auto hello = handoff::encode(handoff::Hello{7});
  old_taker.send({.type = handoff::kTypeHello, .payload = hello}, 10s);
  answer = old_taker.receive({}, 10s);
  holder2.join();
  handoff::Refusal refusal;
  ASSERT_TRUE(handoff::decode(answer.payload, refusal).ok);
  EXPECT_EQ(refusal.reason, handoff::Reason::version);
  EXPECT_EQ(outcome.result, handoff::ServeResult::refused);

  std::thread holder3([&] { outcome = server.serve(10s); });
  handoff::Takeover taken = handoff::take_listeners(control);
  holder3.join();
  EXPECT_EQ(outcome.result, handoff::ServeResult::handed_over);
  ASSERT_EQ(taken.listeners.size(), 1u);
}

}  // namespace
}  // namespace sockshare

namespace sockshare {
namespace {

// A live holder whose control backlog is full keeps its socket file: the stale-file probe
// must not hang on it, nor take the file over.
TEST_F(HandoffProcess, LiveHolderWithAFullBacklogKeepsItsControlFile) {
  TempDir dir;
  const Endpoint control = parse_endpoint("unix:" + dir.file("control.sock"));
  HandoffServer live = HandoffServer::listen(control);
  std::vector<Fd> queued;
  for (int i = 0; i < 64; ++i) {
    Fd c(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path, control.path.data(), control.path.size());
    if (::connect(c.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) break;
    queued.push_back(std::move(c));
  }
  try {
    (void)HandoffServer::listen(control);
    FAIL() << "a live holder's control file was taken over";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), EADDRINUSE) << e.what();
  }
}

}  // namespace
}  // namespace sockshare
