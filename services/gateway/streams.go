package main

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// A backend connection's ClassifyStreams, one per caller credential. The server checks a
// stream's token once, when it opens, and acts for that principal on every item (its tenant
// rule, its rate limit, its token's expiry: vision_server's edges/stream.py), so a stream may
// only carry the items of callers that sent the same `authorization`: one caller's Classify
// must never run as another's. Callers with the same token (or none, in development) still
// share one stream, which is what batching needs. A credential's stream is opened with that
// credential's metadata only (the first caller's other headers are not the others'), and is
// closed once no call has used it for idleAfter. At most maxKeys credentials have a stream on
// one connection; a caller beyond them is forwarded call by call, which is as correct, only
// dearer for the server.

// muxPool is the multiplexers of one backend connection, by credential.
type muxPool struct {
	conn       *grpc.ClientConn
	maxAge     time.Duration // a stream takes new items this long (--stream-max-age)
	idleAfter  time.Duration // a credential's stream unused this long is closed (--stream-idle)
	maxKeys    int           // credentials with a stream at once (--max-token-streams)
	onInstance func()        // called, without mu, when instance changes
	opened     atomic.Uint64 // streams opened (a metric)
	idleClosed atomic.Uint64 // credentials' streams closed for idleness (a metric)

	mu       sync.Mutex
	byKey    map[string]*multiplexer
	instance string // the backend process this connection reaches (placement.go); "" unknown
	done     chan struct{}
	stopOnce sync.Once
}

func newMuxPool(conn *grpc.ClientConn, maxAge, idleAfter time.Duration, maxKeys int, onInstance func()) *muxPool {
	p := &muxPool{
		conn: conn, maxAge: maxAge, idleAfter: idleAfter, maxKeys: maxKeys, onInstance: onInstance,
		byKey: map[string]*multiplexer{}, done: make(chan struct{}),
	}
	go p.sweepLoop()
	return p
}

// credentialOf is the key of a caller's stream and the metadata that stream opens with: its
// `authorization` values, as sent ("" and nil: none).
func credentialOf(incoming metadata.MD) (string, metadata.MD) {
	values := incoming.Get("authorization")
	if len(values) == 0 {
		return "", nil
	}
	return strings.Join(values, "\n"), metadata.MD{"authorization": append([]string(nil), values...)}
}

// acquire returns the multiplexer for this credential, held until release; nil when maxKeys
// other credentials have one on this connection already.
func (p *muxPool) acquire(key string, md metadata.MD) *multiplexer {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.byKey[key]
	if m == nil {
		if len(p.byKey) >= p.maxKeys {
			return nil
		}
		m = newMultiplexer(p, md)
		p.byKey[key] = m
	}
	m.users++
	return m
}

func (p *muxPool) release(m *multiplexer) {
	p.mu.Lock()
	m.users--
	m.lastUsed = time.Now()
	p.mu.Unlock()
}

// sweep retires the streams of credentials no caller has used for idleAfter: a caller that
// has gone (a token that expired, a school that stopped for the night) keeps no stream open
// on the server and no principal acting there.
func (p *muxPool) sweep(now time.Time) {
	var idle []*multiplexer
	p.mu.Lock()
	for key, m := range p.byKey {
		if m.users == 0 && now.Sub(m.lastUsed) >= p.idleAfter {
			delete(p.byKey, key)
			idle = append(idle, m)
		}
	}
	p.mu.Unlock()
	for _, m := range idle {
		m.retire()
		p.idleClosed.Add(1)
	}
}

func (p *muxPool) sweepLoop() {
	every := max(p.idleAfter/4, 5*time.Millisecond)
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		select {
		case now := <-ticker.C:
			p.sweep(now)
		case <-p.done:
			return
		}
	}
}

// credentials is how many credentials have a multiplexer on this connection now.
func (p *muxPool) credentials() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.byKey)
}

func (p *muxPool) close() {
	p.stopOnce.Do(func() { close(p.done) })
	p.mu.Lock()
	all := p.byKey
	p.byKey = map[string]*multiplexer{}
	p.mu.Unlock()
	for _, m := range all {
		m.close()
	}
}
