package main

import "math"

// Which connection's ClassifyStream an item goes to. The gateway keeps several connections
// per backend address (a backend of worker processes behind one port, SO_REUSEPORT, is reached
// on several of them), but spreading items over every connection would split each worker's
// items over several streams and leave one item per stream message: the Python server then
// pays grpc's per-message work per photo again. So connections are grouped by the process they
// reach, which the server names in each ClassifyStream's headers (instanceHeader), and a group
// sends all its items on one stream, its lead's. Items go to the group with the fewest calls
// in flight, which is the balance across processes. A connection whose process is unknown yet
// (no stream opened, a server that does not name itself, a stream that broke) is a group of
// its own, as every connection was before.

// instanceHeader is the ClassifyStream header in which the vision server names its process.
const instanceHeader = "snaplearn-server-instance"

// connGroup is the connections that reach one backend process.
type connGroup struct {
	lead    *backendConn // its stream carries the group's items
	members []*backendConn
}

// regroup rebuilds the groups from what each connection's streams said; called at start and
// whenever a connection's process changes (rare: a stream opened, broke or was ended).
func (p *proxy) regroup() {
	p.groupsMu.Lock()
	defer p.groupsMu.Unlock()
	groups := make([]connGroup, 0, len(p.conns))
	byInstance := map[string]int{}
	for _, c := range p.conns {
		instance := ""
		if c.mux != nil && p.groupByProcess {
			instance = c.mux.backendInstance()
		}
		if instance != "" {
			if i, ok := byInstance[instance]; ok {
				groups[i].members = append(groups[i].members, c)
				continue
			}
			byInstance[instance] = len(groups)
		}
		groups = append(groups, connGroup{lead: c, members: []*backendConn{c}})
	}
	p.groups.Store(&groups)
}

// pickStream returns the connection whose stream takes the next Classify item: the lead of the
// group carrying the fewest calls, starting the scan at a rotating index so that ties spread.
func (p *proxy) pickStream() *backendConn {
	groups := *p.groups.Load()
	start := int(p.next.Add(1))
	var best *backendConn
	bestLoad := int64(math.MaxInt64)
	for i := range groups {
		g := &groups[(start+i)%len(groups)]
		var load int64
		for _, c := range g.members {
			load += c.inFlight.Load()
		}
		if load < bestLoad {
			best, bestLoad = g.lead, load
		}
	}
	return best
}

// noteInstance records the process stream s reaches (its header), or "" once it broke or
// ended. Only the current stream (or a stream when there is none) speaks for the connection,
// and only a stream that named the process can unname it: a retired stream ending, or a
// stream the server refused for its caller's token before naming itself, says nothing about
// the connection, which other callers' streams still use.
func (m *multiplexer) noteInstance(s *muxStream, instance string) {
	m.mu.Lock()
	speaks := m.current == s || m.current == nil
	m.mu.Unlock()
	if instance == "" {
		s.mu.Lock()
		speaks = speaks && s.instance != "" && !s.retired
		s.mu.Unlock()
	}
	if speaks {
		m.pool.noteInstance(instance)
	}
}

// noteInstance records the process this connection reaches; on a change it regroups.
func (p *muxPool) noteInstance(instance string) {
	p.mu.Lock()
	changed := p.instance != instance
	p.instance = instance
	p.mu.Unlock()
	if changed && p.onInstance != nil {
		p.onInstance()
	}
}

// backendInstance is the process this connection's streams reach, "" if unknown.
func (p *muxPool) backendInstance() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.instance
}
