package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// frame is one gRPC message, carried as opaque bytes: the gateway never decodes a payload
// (images pass through untouched and are never logged).
type frame struct{ payload []byte }

// rawCodec passes message bytes through. Its name is "proto" so that the content-type both
// sides see stays application/grpc(+proto).
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	f, ok := v.(*frame)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return f.payload, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	f, ok := v.(*frame)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	f.payload = append(f.payload[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// backendConn is one connection to a backend, with the admitted calls it carries now.
type backendConn struct {
	conn     *grpc.ClientConn
	mux      *muxPool // Classify calls go to its ClassifyStreams (one per caller token); nil: forwarded as calls
	inFlight atomic.Int64
}

// proxy forwards every gRPC method to the backends and refuses admitted methods (the
// inference calls) beyond maxInFlight at once, before any backend sees them.
type proxy struct {
	conns          []*backendConn
	admitted       map[string]bool // full method names ("/pkg.Service/Method") under the limit
	maxInFlight    int64
	refusal        error // the RESOURCE_EXHAUSTED a refused call gets, built once
	inFlight       atomic.Int64
	next           atomic.Uint64
	stats          *stats
	multiplexed    bool                        // Classify calls go as items of ClassifyStreams
	groupByProcess bool                        // one stream per backend process, not per connection (placement.go)
	groups         atomic.Pointer[[]connGroup] // the connections by backend process (placement.go)
	groupsMu       sync.Mutex                  // serialises regroup
	requireToken   bool                        // calls without `authorization` are refused in the tap
}

// tokenFreeMethods answer without a token on the servers (probes), so the gateway never asks for one.
var tokenFreeMethods = map[string]bool{
	"/grpc.health.v1.Health/Check":                true,
	"/grpc.health.v1.Health/Watch":                true,
	"/inference.GRPCInferenceService/ServerLive":  true,
	"/inference.GRPCInferenceService/ServerReady": true,
	"/inference.GRPCInferenceService/ModelReady":  true,
}

// errNoToken is what a call without a token gets with --require-token: the servers' own words.
var errNoToken = status.Error(codes.Unauthenticated, "no bearer token: send 'authorization: Bearer <token>'")

// refusalFor is the RESOURCE_EXHAUSTED a client gets from the gateway: what is full, and what to do.
func refusalFor(maxInFlight int64) error {
	return status.Errorf(codes.ResourceExhausted,
		"server overloaded: %d requests in flight, the gateway's limit (--max-in-flight); retry with backoff",
		maxInFlight)
}

// pick returns the connection carrying the fewest admitted calls, starting the scan at a
// rotating index so that ties spread out.
func (p *proxy) pick() *backendConn {
	start := int(p.next.Add(1))
	best := p.conns[start%len(p.conns)]
	for i := 1; i < len(p.conns); i++ {
		c := p.conns[(start+i)%len(p.conns)]
		if c.inFlight.Load() < best.inFlight.Load() {
			best = c
		}
	}
	return best
}

// refuseEarly is the server's tap (grpc.InTapHandle), run as a call's headers arrive: at
// the limit, an admitted call is refused there, before grpc starts a goroutine for it or
// reads its message, which makes a refusal cheaper for the gateway's one core under heavy
// overload. It never reserves a slot: handle's own check stays the authority, so a call that
// passes here may still be refused there, and nothing admitted here can leak a slot.
//
// With --require-token a call without `authorization` (probes excepted) is refused here too,
// UNAUTHENTICATED: the gateway does not verify tokens (the servers do, every one), it only
// spares them calls that cannot pass.
func (p *proxy) refuseEarly(ctx context.Context, info *tap.Info) (context.Context, error) {
	if p.requireToken && !tokenFreeMethods[info.FullMethodName] && len(info.Header.Get("authorization")) == 0 {
		p.stats.tokenless.Add(1)
		return ctx, errNoToken
	}
	if p.admitted[info.FullMethodName] && p.inFlight.Load() >= p.maxInFlight {
		return ctx, p.refuse()
	}
	return ctx, nil
}

// refuse counts a refusal at the limit and returns the RESOURCE_EXHAUSTED its caller gets.
func (p *proxy) refuse() error {
	p.stats.refused.Add(1)
	return p.refusal
}

// handle serves every method (grpc.UnknownServiceHandler): admitted methods take the unary
// path under the in-flight limit, everything else (health, reflection, metadata) streams.
func (p *proxy) handle(_ any, stream grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(stream)
	if !ok {
		return status.Error(codes.Internal, "gateway: no method name on the stream")
	}
	if !p.admitted[method] {
		return p.forwardStream(outgoingContext(stream.Context()), stream, method, p.pick())
	}
	// Admission first: a refused call costs nothing more than this.
	if p.inFlight.Add(1) > p.maxInFlight {
		p.inFlight.Add(-1)
		return p.refuse()
	}
	defer p.inFlight.Add(-1)
	arrived := time.Now()
	var err error
	var waited time.Duration // on the backend, for its answer
	if p.multiplexed && method == classifyMethod {
		backend := p.pickStream()
		backend.inFlight.Add(1)
		waited, err = p.classifyMultiplexed(stream.Context(), stream, backend)
		backend.inFlight.Add(-1)
	} else {
		waited, err = p.forwardUnary(outgoingContext(stream.Context()), stream, method, p.pick())
	}
	p.stats.count(err)
	p.stats.observe(time.Since(arrived), waited)
	return err
}

// forwardUnary relays one request and its answer (headers, message, trailers, status);
// waited is the time the backend took to answer (0 if the request never reached it).
func (p *proxy) forwardUnary(ctx context.Context, stream grpc.ServerStream, method string, backend *backendConn) (waited time.Duration, err error) {
	var in, out frame
	if err := stream.RecvMsg(&in); err != nil {
		return 0, err
	}
	backend.inFlight.Add(1)
	defer backend.inFlight.Add(-1)
	var header, trailer metadata.MD
	handedOn := time.Now()
	err = backend.conn.Invoke(ctx, method, &in, &out,
		grpc.ForceCodec(rawCodec{}), grpc.Header(&header), grpc.Trailer(&trailer))
	waited = time.Since(handedOn)
	if len(header) > 0 {
		if sendErr := stream.SendHeader(header); sendErr != nil && err == nil {
			return waited, sendErr
		}
	}
	stream.SetTrailer(trailer)
	if err != nil {
		return waited, err // the backend's status, code and message unchanged
	}
	return waited, stream.SendMsg(&out)
}

// forwardStream relays a call of any shape both ways until either side ends it.
func (p *proxy) forwardStream(ctx context.Context, stream grpc.ServerStream, method string, backend *backendConn) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	client, err := backend.conn.NewStream(ctx, desc, method, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	toBackend := make(chan error, 1)
	go func() {
		for {
			var f frame
			if err := stream.RecvMsg(&f); err != nil {
				if errors.Is(err, io.EOF) {
					toBackend <- client.CloseSend()
				} else {
					toBackend <- err
				}
				return
			}
			if err := client.SendMsg(&f); err != nil {
				toBackend <- err // the backend ended the call; its status comes from RecvMsg
				return
			}
		}
	}()
	header, err := client.Header()
	if err == nil && len(header) > 0 {
		if err := stream.SendHeader(header); err != nil {
			return err
		}
	}
	for {
		var f frame
		if err := client.RecvMsg(&f); err != nil {
			stream.SetTrailer(client.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := stream.SendMsg(&f); err != nil {
			return err
		}
		select {
		case sendErr := <-toBackend:
			if sendErr != nil {
				return sendErr // the client's side failed (cancelled, reset)
			}
		default:
		}
	}
}

// outgoingContext carries the caller's metadata (and, through ctx, its deadline and
// cancellation) to the backend, less the headers gRPC sets itself.
func outgoingContext(ctx context.Context) context.Context {
	incoming, _ := metadata.FromIncomingContext(ctx)
	out := metadata.MD{}
	for key, values := range incoming {
		if strings.HasPrefix(key, ":") || key == "content-type" || key == "user-agent" || key == "te" ||
			(strings.HasPrefix(key, "grpc-") && key != "grpc-trace-bin") {
			continue
		}
		out[key] = values
	}
	return metadata.NewOutgoingContext(ctx, out)
}
