"""Test tooling shared by the suite, the fault tests and the benchmark.

- env: the repository, the venv's binaries, free ports, commands, settings read cleanly;
- polling: `eventually`, waiting for a condition;
- stats: `percentile`;
- orders: request builders, an order's activity attempts;
- money: `assert_money_moved`, the gateway's captures and refunds of an order;
- stack: a worker and a gRPC server on a task queue of their own, and a stub;
- cluster: the same as real processes, killed for real; the providers' ledger audited;
- load: many orders driven at once, every one audited;
- docs: `make docs`;
- keys, jwt, access: the keys encrypted with, an identity provider and a guarded server,
  each role's RPCs and a call of every RPC;
- logs, payloads, spans, emails: what the processes log, a history's payloads, a server's
  spans, the emails the outbox holds;
- codec_server, fake_temporal: a codec server in this process, a Temporal that answers
  from memory for the servicer's unit tests;
- proxy, counting_proxy, h2_client, call_counts: a TCP proxy, a counting gRPC proxy in
  front of Temporal, a client that never reads, the Temporal calls per RPC.
"""
