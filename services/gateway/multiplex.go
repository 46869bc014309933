package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Classify calls multiplexed onto ClassifyStream (protos/snaplearn/vision/v1/vision.proto):
// each backend connection carries one long-lived stream, and every Classify the gateway admits
// becomes one item on it. The Python server then pays grpc's per-call work once per stream
// message, not once per photo, and a message carries whatever was waiting when the sender got
// to it (no added delay: an idle gateway sends each item at once). The request bytes are
// wrapped, never decoded; the answer's ClassifyResponse bytes go back to the caller as they
// came. A caller that goes away (cancelled, deadline) gets its status at once and the item is
// cancelled on the stream, which takes it out of the server's queue.

const (
	classifyMethod       = "/snaplearn.vision.v1.VisionService/Classify"
	classifyStreamMethod = "/snaplearn.vision.v1.VisionService/ClassifyStream"
	maxPackedItems       = 64
	maxPackedBytes       = 1 << 20 // an item larger than this goes alone (the server takes one as large as a call)
	streamOpenPatience   = time.Second
	streamRetryPause     = 20 * time.Millisecond
	retiredStreamGrace   = 30 * time.Second // a retired stream's last items get this long before it is cut
)

// muxResult is one item's answer: a status, and the ClassifyResponse bytes when it is OK.
type muxResult struct {
	code     codes.Code
	message  string
	response []byte
	trailer  metadata.MD // a stream refused for its credential: the server's trailer (e.g. its retry delay)
}

// muxCall is one admitted Classify waiting for its item's answer.
type muxCall struct {
	id       uint64
	request  []byte    // the caller's ClassifyRequest, as received
	deadline time.Time // zero: none
	done     chan muxResult
	answered atomic.Bool
	stream   atomic.Pointer[muxStream] // the stream it was last put on
}

// abandon is the caller going away (see muxStream.abandon).
func (c *muxCall) abandon(cancelIt bool) {
	if s := c.stream.Load(); s != nil {
		s.abandon(c, cancelIt)
	} else {
		c.answered.Store(true)
	}
}

// answer delivers the first result only (the stream's answer, its failure or the caller's cancel race).
func (c *muxCall) answer(r muxResult) bool {
	if !c.answered.CompareAndSwap(false, true) {
		return false
	}
	c.done <- r
	return true
}

// muxStream is one ClassifyStream call: its unanswered items, and what waits to be sent.
type muxStream struct {
	mux     *multiplexer
	client  grpc.ClientStream
	cancel  context.CancelFunc
	opened  time.Time
	send    chan *muxCall
	cancels chan uint64
	idle    chan struct{} // poked when a retired stream may have no items left

	mu       sync.Mutex
	pending  map[uint64]*muxCall
	failed   bool   // no new items: the stream broke
	retired  bool   // no new items: a newer stream took over, or it was idle; closes once its items are answered
	instance string // the process its headers named ("": none yet, or refused before its handler ran)
}

// multiplexer owns the ClassifyStream of one backend connection for one caller credential
// (streams.go), opened with that credential's metadata, reopening it when it breaks and
// replacing it when it is older than maxAge (a server's max connection age then never cuts
// one short with items on it).
type multiplexer struct {
	pool    *muxPool
	md      metadata.MD // sent when a stream opens: the callers' authorization, nothing else
	nextID  atomic.Uint64
	mu      sync.Mutex
	current *muxStream
	opening chan struct{} // closed when the stream being opened is current (or failed to open)
	openErr error         // why the last opening failed
	ctx     context.Context
	stop    context.CancelFunc

	users    int       // callers holding it now (pool.mu)
	lastUsed time.Time // when the last of them let go (pool.mu)
}

func newMultiplexer(pool *muxPool, md metadata.MD) *multiplexer {
	ctx, stop := context.WithCancel(context.Background())
	return &multiplexer{pool: pool, md: md, ctx: ctx, stop: stop}
}

func (m *multiplexer) close() { m.stop() }

// retire takes no new items: the current stream finishes what it carries, then closes its
// side (the server ends it OK), and the multiplexer is stopped once it has ended.
func (m *multiplexer) retire() {
	m.mu.Lock()
	s := m.current
	m.current = nil
	m.mu.Unlock()
	if s == nil {
		m.stop()
		return
	}
	s.mu.Lock()
	s.retired = true
	s.mu.Unlock()
	s.poke()
	go func() {
		select {
		case <-s.client.Context().Done():
		case <-time.After(retiredStreamGrace):
		}
		m.stop()
	}()
}

// stream returns the stream new items go to, opening one when there is none, it broke or it
// is too old. Opening runs apart from the caller, so a caller waits at most until its own
// deadline for a backend that does not answer (as a forwarded call would).
func (m *multiplexer) stream(ctx context.Context) (*muxStream, error) {
	m.mu.Lock()
	if s := m.usableLocked(); s != nil {
		m.mu.Unlock()
		return s, nil
	}
	if m.opening == nil {
		m.opening = make(chan struct{})
		go m.open(m.opening)
	}
	opening := m.opening
	m.mu.Unlock()
	select {
	case <-opening:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.current != nil:
		return m.current, nil // if it broke already, add() refuses and submit tries once more
	case m.openErr != nil:
		return nil, m.openErr
	default:
		return nil, errors.New("the new stream closed at once")
	}
}

// usableLocked returns the current stream if it takes new items, else drops it (retiring it
// when it is only too old). m.mu is held.
func (m *multiplexer) usableLocked() *muxStream {
	s := m.current
	if s == nil {
		return nil
	}
	s.mu.Lock()
	broken := s.failed
	tooOld := !broken && time.Since(s.opened) >= m.pool.maxAge
	if tooOld {
		s.retired = true // its items finish on it; new ones go to the next stream
	}
	s.mu.Unlock()
	if !broken && !tooOld {
		return s
	}
	m.current = nil
	if tooOld {
		s.poke()
	}
	return nil
}

// open opens a ClassifyStream, makes it current (or records why it could not), and closes done.
func (m *multiplexer) open(done chan struct{}) {
	ctx, cancel := context.WithCancel(m.ctx)
	if len(m.md) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, m.md)
	}
	client, err := m.pool.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true},
		classifyStreamMethod, grpc.ForceCodec(rawCodec{}))
	m.mu.Lock()
	defer m.mu.Unlock()
	defer close(done)
	m.opening = nil
	if err != nil {
		cancel()
		m.current, m.openErr = nil, err
		return
	}
	s := &muxStream{
		mux: m, client: client, cancel: cancel, opened: time.Now(), send: make(chan *muxCall, 1024),
		cancels: make(chan uint64, 1024), idle: make(chan struct{}, 1), pending: map[uint64]*muxCall{},
	}
	m.current, m.openErr = s, nil
	m.pool.opened.Add(1)
	go s.sendLoop()
	go s.receiveLoop()
}

// submit puts a call on the current stream; the answer arrives on call.done.
func (m *multiplexer) submit(ctx context.Context, call *muxCall) error {
	call.id = m.nextID.Add(1)
	return m.place(ctx, call)
}

// place puts a call on a stream that takes it. A stream that cannot be opened is tried again
// for up to streamOpenPatience (within the caller's deadline): a backend worker restarting
// leaves its connection reconnecting for a moment, which should cost no call.
func (m *multiplexer) place(ctx context.Context, call *muxCall) error {
	patience := time.Now().Add(streamOpenPatience)
	for {
		s, err := m.stream(ctx)
		if err == nil && s.add(call) {
			return nil
		}
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		if time.Now().After(patience) {
			if err == nil {
				return status.Error(codes.Unavailable, "the vision server's stream keeps closing; retry")
			}
			return status.Errorf(codes.Unavailable, "the vision server cannot be reached (%v); retry", err)
		}
		select {
		case <-time.After(streamRetryPause):
		case <-ctx.Done():
		}
	}
}

func (s *muxStream) add(call *muxCall) bool {
	s.mu.Lock()
	if s.failed || s.retired {
		s.mu.Unlock()
		return false
	}
	if call.answered.Load() { // its caller gave up (while it was being resent)
		s.mu.Unlock()
		return true
	}
	s.pending[call.id] = call
	call.stream.Store(s)
	s.mu.Unlock()
	select {
	case s.send <- call:
	case <-s.client.Context().Done(): // broke: fail() answers every pending call, this one too
	}
	return true
}

// abandon is the caller going away: its answer is no longer wanted. A cancelled caller's id
// goes to the server (cancelIt); an expired one's does not: the item carries the same
// deadline, so the server expires it itself and counts it as DEADLINE_EXCEEDED.
func (s *muxStream) abandon(call *muxCall, cancelIt bool) {
	s.mu.Lock()
	_, unanswered := s.pending[call.id]
	delete(s.pending, call.id)
	s.mu.Unlock()
	call.answered.Store(true)
	if unanswered && cancelIt {
		select {
		case s.cancels <- call.id:
		default: // a full cancel queue: the item is computed and its answer dropped
		}
	}
	s.poke()
}

func (s *muxStream) poke() {
	select {
	case s.idle <- struct{}{}:
	default:
	}
}

// fail answers every unanswered item UNAVAILABLE (nothing is lost silently) and ends the stream.
// A stream the server refused for its credential (no or a bad token, a scope it lacks, the
// caller's rate limit) was that caller's alone (streams.go), so its items get the server's own
// status, message and trailer instead: what the same Classify sent as a call would have got.
// fromServer: err is the status RecvMsg returned (the server's, its trailer readable).
func (s *muxStream) fail(err error, fromServer bool) {
	calls := s.end()
	st := status.Convert(err)
	r := muxResult{code: codes.Unavailable, message: fmt.Sprintf("the vision server's stream ended (%v); retry", st.Message())}
	if fromServer && callerStatus(st.Code()) {
		r = muxResult{code: st.Code(), message: st.Message(), trailer: s.client.Trailer()}
	}
	for _, call := range calls {
		call.answer(r)
	}
}

// callerStatus: a status a stream ends with that is about its caller's credential, not the server.
func callerStatus(code codes.Code) bool {
	return code == codes.Unauthenticated || code == codes.PermissionDenied || code == codes.ResourceExhausted
}

// endedByServer is the server ending the stream OK with items unanswered: it is shutting down,
// and it started none of them, so each goes to a fresh stream (on a new connection: the old one
// got GOAWAY), which reaches a server that is still serving. Nothing is lost or run twice.
func (s *muxStream) endedByServer() {
	for _, call := range s.end() {
		go s.mux.resend(call)
	}
}

// end takes no more items, cancels the stream, forgets which process it reached, and returns
// its unanswered calls (for fail or endedByServer to answer or resend).
func (s *muxStream) end() map[uint64]*muxCall {
	s.mu.Lock()
	s.failed = true
	calls := s.pending
	s.pending = map[uint64]*muxCall{}
	s.mu.Unlock()
	s.cancel()
	s.mux.noteInstance(s, "")
	return calls
}

func (m *multiplexer) resend(call *muxCall) {
	if call.answered.Load() {
		return
	}
	ctx, cancel := m.ctx, context.CancelFunc(func() {})
	if !call.deadline.IsZero() {
		ctx, cancel = context.WithDeadline(m.ctx, call.deadline)
	}
	defer cancel()
	if err := m.place(ctx, call); err != nil {
		st := status.Convert(err)
		call.answer(muxResult{code: st.Code(), message: st.Message()})
	}
}

// sendLoop packs what is waiting into one message at a time. It is the only goroutine that
// sends on the stream (grpc-go forbids concurrent SendMsg/CloseSend).
func (s *muxStream) sendLoop() {
	var calls []*muxCall
	var cancels []uint64
	for {
		calls, cancels = calls[:0], cancels[:0]
		select {
		case call := <-s.send:
			calls = append(calls, call)
		case id := <-s.cancels:
			cancels = append(cancels, id)
		case <-s.idle:
			if s.finished() {
				_ = s.client.CloseSend()
				return
			}
			continue
		case <-s.client.Context().Done():
			return
		}
		size := 0
		if len(calls) > 0 {
			size = len(calls[0].request)
			// Let callers that are running already queue their items first: they join this
			// message instead of each costing the server a message of its own.
			runtime.Gosched()
		}
	pack:
		for len(calls) < maxPackedItems && size < maxPackedBytes {
			select {
			case call := <-s.send:
				calls = append(calls, call)
				size += len(call.request)
			case id := <-s.cancels:
				cancels = append(cancels, id)
			default:
				break pack
			}
		}
		now := time.Now()
		live := calls[:0]
		for _, call := range calls {
			switch {
			case call.answered.Load(): // abandoned by its caller while waiting to be sent
				s.deliver(call.id, muxResult{}) // only forgets it: the first answer was the caller's
			case !call.deadline.IsZero() && !now.Before(call.deadline):
				s.deliver(call.id, muxResult{code: codes.DeadlineExceeded, message: "the call's deadline passed in the gateway"})
			default:
				live = append(live, call)
			}
		}
		if len(live) == 0 && len(cancels) == 0 {
			continue
		}
		// A fresh buffer each time: grpc-go may still be writing the last one after SendMsg returns.
		buf := encodeStreamRequest(make([]byte, 0, size+16*len(live)+8*len(cancels)+16), live, cancels, now)
		if err := s.client.SendMsg(&frame{payload: buf}); err != nil {
			if !errors.Is(err, io.EOF) {
				s.fail(err, false) // the receive loop sees the status; everything pending is answered there or here
			}
			// io.EOF: the server ended the stream; its status (a refusal of this stream's token, or
			// OK at shutdown) reaches the receive loop, which answers or resends what is pending.
			return
		}
	}
}

func (s *muxStream) isRetired() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retired
}

func (s *muxStream) finished() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retired && len(s.pending) == 0 && len(s.send) == 0
}

// receiveLoop hands each answer to its caller, once it has noted which process the
// stream reaches (the server sends its headers when the stream opens).
func (s *muxStream) receiveLoop() {
	if header, err := s.client.Header(); err == nil {
		if instance := header.Get(instanceHeader); len(instance) > 0 {
			s.mu.Lock()
			s.instance = instance[0]
			s.mu.Unlock()
			s.mux.noteInstance(s, instance[0])
		}
	}
	for {
		var f frame
		err := s.client.RecvMsg(&f)
		if errors.Is(err, io.EOF) {
			s.endedByServer()
			return
		}
		if err != nil {
			s.fail(err, true)
			return
		}
		if err := decodeStreamResponse(f.payload, s.deliver); err != nil {
			s.fail(status.Errorf(codes.Internal, "undecodable ClassifyStreamResponse: %v", err), false)
			return
		}
		if s.isRetired() { // it may have answered its last item: the sender closes it then
			s.poke()
		}
	}
}

func (s *muxStream) deliver(id uint64, r muxResult) {
	s.mu.Lock()
	call := s.pending[id]
	delete(s.pending, id)
	s.mu.Unlock()
	if call != nil {
		call.answer(r)
	}
}

// encodeStreamRequest appends a ClassifyStreamRequest carrying calls (each with the time left
// before its deadline, all still in the future at `now`) and the cancelled ids.
func encodeStreamRequest(buf []byte, calls []*muxCall, cancels []uint64, now time.Time) []byte {
	for _, call := range calls {
		timeoutMs := 0.0
		if !call.deadline.IsZero() {
			timeoutMs = float64(call.deadline.Sub(now)) / float64(time.Millisecond)
		}
		size := protowire.SizeTag(1) + protowire.SizeVarint(call.id) + protowire.SizeTag(2) + protowire.SizeBytes(len(call.request))
		if timeoutMs > 0 {
			size += protowire.SizeTag(3) + protowire.SizeFixed64()
		}
		buf = protowire.AppendTag(buf, 1, protowire.BytesType) // ClassifyStreamRequest.items
		buf = protowire.AppendVarint(buf, uint64(size))
		buf = protowire.AppendTag(buf, 1, protowire.VarintType) // ClassifyStreamItem.id
		buf = protowire.AppendVarint(buf, call.id)
		buf = protowire.AppendTag(buf, 2, protowire.BytesType) // .request
		buf = protowire.AppendBytes(buf, call.request)
		if timeoutMs > 0 {
			buf = protowire.AppendTag(buf, 3, protowire.Fixed64Type) // .timeout_ms
			buf = protowire.AppendFixed64(buf, math.Float64bits(timeoutMs))
		}
	}
	if len(cancels) > 0 {
		packed := 0
		for _, id := range cancels {
			packed += protowire.SizeVarint(id)
		}
		buf = protowire.AppendTag(buf, 2, protowire.BytesType) // .cancel_ids, packed
		buf = protowire.AppendVarint(buf, uint64(packed))
		for _, id := range cancels {
			buf = protowire.AppendVarint(buf, id)
		}
	}
	return buf
}

// decodeStreamResponse calls deliver for each ClassifyStreamResult in a ClassifyStreamResponse.
func decodeStreamResponse(data []byte, deliver func(uint64, muxResult)) error {
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return protowire.ParseError(n)
		}
		data = data[n:]
		if num != 1 || typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, data); n < 0 {
				return protowire.ParseError(n)
			}
			data = data[n:]
			continue
		}
		result, n := protowire.ConsumeBytes(data)
		if n < 0 {
			return protowire.ParseError(n)
		}
		data = data[n:]
		id, r, err := decodeStreamResult(result)
		if err != nil {
			return err
		}
		deliver(id, r)
	}
	return nil
}

func decodeStreamResult(data []byte) (uint64, muxResult, error) {
	var id uint64
	var r muxResult
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return 0, r, protowire.ParseError(n)
		}
		data = data[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			id, n = protowire.ConsumeVarint(data)
		case num == 2 && typ == protowire.VarintType:
			var code uint64
			code, n = protowire.ConsumeVarint(data)
			r.code = codes.Code(int32(code))
		case num == 3 && typ == protowire.BytesType:
			var message []byte
			message, n = protowire.ConsumeBytes(data)
			r.message = string(message)
		case num == 4 && typ == protowire.BytesType:
			r.response, n = protowire.ConsumeBytes(data)
		default:
			n = protowire.ConsumeFieldValue(num, typ, data)
		}
		if n < 0 {
			return 0, r, protowire.ParseError(n)
		}
		data = data[n:]
	}
	return id, r, nil
}

// classifyMultiplexed serves one admitted Classify as an item on the backend connection's
// stream; waited is the time from handing the item on to its answer (0 if none came).
// The item goes on the stream of the caller's own credential (streams.go); a caller whose
// credential finds no room is forwarded as a call.
func (p *proxy) classifyMultiplexed(ctx context.Context, stream grpc.ServerStream, backend *backendConn) (waited time.Duration, err error) {
	incoming, _ := metadata.FromIncomingContext(ctx)
	key, md := credentialOf(incoming)
	mux := backend.mux.acquire(key, md)
	if mux == nil {
		p.stats.overflowed.Add(1)
		return p.forwardUnary(outgoingContext(ctx), stream, classifyMethod, backend)
	}
	defer backend.mux.release(mux)
	var in frame
	if err := stream.RecvMsg(&in); err != nil {
		return 0, err
	}
	call := &muxCall{request: in.payload, done: make(chan muxResult, 1)}
	call.deadline, _ = ctx.Deadline()
	handedOn := time.Now()
	if err := mux.submit(ctx, call); err != nil {
		return 0, err
	}
	select {
	case r := <-call.done:
		waited = time.Since(handedOn)
		if r.code != codes.OK {
			if len(r.trailer) > 0 {
				stream.SetTrailer(r.trailer)
			}
			return waited, status.Error(r.code, r.message)
		}
		return waited, stream.SendMsg(&frame{payload: r.response})
	case <-ctx.Done():
		// A caller's own deadline usually reaches us as its cancellation (its timer fires
		// first): judge by the deadline itself.
		if !call.deadline.IsZero() && !time.Now().Before(call.deadline) {
			call.abandon(false)
			return 0, status.Error(codes.DeadlineExceeded, "the call's deadline passed")
		}
		call.abandon(true)
		return 0, status.FromContextError(ctx.Err()).Err()
	}
}
