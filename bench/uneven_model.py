#!/usr/bin/env python3
"""What the uneven-work target of bench/serve_bench.sh can reach at best, by simulation.

Two single-threaded workers; requests arrive as a Poisson stream; 5% take BURN_MS of CPU, the
rest SHORT_US. Two ways to spread them, both idealised (no dispatch cost, no CPU shared with a
load generator or a dispatcher):

  random  each request goes to a worker drawn at random and queues there: SO_REUSEPORT's blind
          spread (the kernel hashes the 4-tuple);
  shared  one queue, the next request goes to the first worker free: the best any dispatcher
          can do without knowing a request's cost in advance (least-loaded holding
          connections in the backlog while every worker is busy approaches it).

Prints p99 latency (arrival to end of service) of each and the ratio shared / random per rate.

  bench/uneven_model.py [--requests 200000] [--seed 1] [--rates 200,400,...]
"""
import argparse
import random

SHORT_US = 60.0   # a tiny request, as measured per worker in docs/benchmarks/serve.md
BURN_MS = 20.0
BURN_SHARE = 0.05
WORKERS = 2


def p99(rate, requests, seed, shared):
    rng = random.Random(seed)
    free_at = [0.0] * WORKERS
    now = 0.0
    latencies = []
    for _ in range(requests):
        now += rng.expovariate(rate)
        service = BURN_MS / 1e3 if rng.random() < BURN_SHARE else SHORT_US / 1e6
        if shared:
            worker = min(range(WORKERS), key=lambda w: free_at[w])
        else:
            worker = rng.randrange(WORKERS)
        start = max(now, free_at[worker])
        free_at[worker] = start + service
        latencies.append(free_at[worker] - now)
    latencies.sort()
    return latencies[int(0.99 * len(latencies))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rates", default="200,400,600,800,1000,1200,1400,1600")
    args = parser.parse_args()
    print(f"{'rate/s':>7} {'busy per worker':>16} {'random p99 ms':>14} {'shared p99 ms':>14} {'ratio':>6}")
    for rate in (float(r) for r in args.rates.split(",")):
        busy = rate * (BURN_SHARE * BURN_MS / 1e3 + (1 - BURN_SHARE) * SHORT_US / 1e6) / WORKERS
        spread = p99(rate, args.requests, args.seed, shared=False)
        queue = p99(rate, args.requests, args.seed, shared=True)
        print(f"{rate:7.0f} {busy:16.2f} {spread * 1e3:14.1f} {queue * 1e3:14.1f} {queue / spread:6.2f}")


if __name__ == "__main__":
    main()
