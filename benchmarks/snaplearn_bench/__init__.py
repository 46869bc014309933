"""SnapLearn's benchmark harness and its scenario commands.

Harness modules (what every scenario shares):

- `paths`: where a checkout keeps models, tools and scratch runs; `log`.
- `processes`: servers, peers and the Go commands as processes: ready lines and ready files,
  free ports, `go build` of the gateway and the load generator, a git ref checked out beside.
- `cpu`: CPU accounting per process tree and per thread, from Linux's /proc.
- `load`: the load generators (closed loop, open loop): the Go one's wrapper and `pyloadgen`,
  the Python one with the same command line and JSON.
- `split`: a load window's latency per layer, from two scrapes of the processes' histograms.
- `report`: table cells, medians, the order of interleaved repetitions.
- `models`, `ours`, `peers`, `peer_servers`, `raw`, `vision_report`: the vision scenarios' parts.

Scenarios (modules with `main()`, each also `python benchmarks/<name>.py`): `vision_bench`,
`vision_ab`, `recommender_serving`, `bus_freshness`, `recommender_simulation`.
"""
