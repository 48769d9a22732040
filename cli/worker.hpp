// The built-in worker: `sockshare __worker`, re-executed by `sockshare serve` when no COMMAND
// is given. A single-threaded epoll HTTP/1.1 server whose answer says which worker (index and
// pid) served the request. It takes its connections either from a dispatcher over the
// channel named by SOCKSHARE_CHANNEL_FD (dispatch mode) or by accepting on the listeners it
// inherited by the systemd convention, LISTEN_FDS (inherit mode).
#pragma once

namespace sockshare::cli {

// Returns the process exit status: 0 after a drain, 1 on a runtime failure (including a
// LISTEN_PID that names another process).
int run_builtin_worker();

}  // namespace sockshare::cli
