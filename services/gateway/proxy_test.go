package main

import (
	"context"
	"io"
	"net"
	"net/http/httptest"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// heldBackend is a real gRPC vision backend whose Classify waits for a release, so a test
// controls exactly how many calls are in flight. It answers with the label the request's
// user id names, and echoes the x-test metadata back as a header and a trailer.
type heldBackend struct {
	visionv1.UnimplementedVisionServiceServer
	entered  chan context.Context
	release  chan struct{}
	received chan string
	instance string // named in ClassifyStream headers ("": not)

	itemStreams atomic.Int64 // its ClassifyStream calls that carried at least one item
	messages    atomic.Int64 // ClassifyStream request messages carrying items
	items       atomic.Int64 // items in them
	streamOf    sync.Map     // user id -> the number of the stream its item came on
	authOf      sync.Map     // user id -> the authorization its item's stream (or its call) came with
}

func (b *heldBackend) Classify(ctx context.Context, req *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	if req.GetUserId() == "" {
		return nil, status.Error(codes.InvalidArgument, "user_id is required")
	}
	b.received <- req.GetUserId()
	md, _ := metadata.FromIncomingContext(ctx)
	if _, onAStream := b.authOf.Load(req.GetUserId()); !onAStream {
		b.authOf.Store(req.GetUserId(), strings.Join(md.Get("authorization"), ","))
	}
	if echo := md.Get("x-test"); len(echo) > 0 {
		_ = grpc.SetHeader(ctx, metadata.Pairs("x-test-header", echo[0]))
		grpc.SetTrailer(ctx, metadata.Pairs("x-test-trailer", echo[0]))
	}
	if strings.HasPrefix(req.GetUserId(), "held") {
		b.entered <- ctx
		select {
		case <-b.release:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	return &visionv1.ClassifyResponse{Labels: []*visionv1.LabelScore{{Label: "topic-of-" + req.GetUserId(), Score: 1}}}, nil
}

type fixture struct {
	server  *grpc.Server // the backend's
	backend *heldBackend
	health  *health.Server
	proxy   *proxy
	client  visionv1.VisionServiceClient
	conn    *grpc.ClientConn
}

func serve(t *testing.T, server *grpc.Server) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return listener.Addr().String()
}

// heldServer runs a held backend (with grpc.health.v1) on port 0, which names itself
// `instance` in its ClassifyStream headers ("": it does not).
func heldServer(t *testing.T, instance string) (*heldBackend, *grpc.Server, *health.Server, string) {
	t.Helper()
	backend := &heldBackend{
		entered: make(chan context.Context, 16), release: make(chan struct{}), received: make(chan string, 1024), // every call sends; read by the tests that check it
		instance: instance,
	}
	server := grpc.NewServer()
	visionv1.RegisterVisionServiceServer(server, backend)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	return backend, server, healthServer, serve(t, server)
}

// start runs a held backend and a gateway in front of it, on port 0.
func start(t *testing.T, maxInFlight int, args ...string) *fixture {
	t.Helper()
	f := &fixture{}
	var backendAddr string
	f.backend, f.server, f.health, backendAddr = heldServer(t, "")
	args = append([]string{"--backend", backendAddr, "--max-in-flight", strconv.Itoa(maxInFlight), "--backend-connections", "2"}, args...)
	f.proxy, f.conn = gateway(t, args...)
	f.client = visionv1.NewVisionServiceClient(f.conn)
	return f
}

// gateway runs a gateway with these flags on port 0, and a connection to it.
func gateway(t *testing.T, args ...string) (*proxy, *grpc.ClientConn) {
	t.Helper()
	o, err := parseArgs(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newProxy(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.close)
	conn, err := grpc.NewClient(serve(t, newServer(p, o)), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return p, conn
}

func classify(f *fixture, ctx context.Context, user string, opts ...grpc.CallOption) (*visionv1.ClassifyResponse, error) {
	return f.client.Classify(ctx, &visionv1.ClassifyRequest{UserId: user, Image: []byte{0xff, 0xd8, 0xff}}, opts...)
}

func TestForwardsTheCallItsMetadataAndTheBackendsAnswer(t *testing.T) {
	f := start(t, 8, "--classify-stream=false") // metadata travels with calls, not with stream items
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-test", "abc")
	var header, trailer metadata.MD
	reply, err := classify(f, ctx, "student-7", grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatal(err)
	}
	if got := reply.GetLabels()[0].GetLabel(); got != "topic-of-student-7" {
		t.Fatalf("label %q", got)
	}
	if header.Get("x-test-header")[0] != "abc" || trailer.Get("x-test-trailer")[0] != "abc" {
		t.Fatalf("metadata not relayed: header %v trailer %v", header, trailer)
	}
}

func TestTheBackendsErrorComesBackUnchanged(t *testing.T) {
	f := start(t, 8)
	_, err := classify(f, context.Background(), "")
	if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != "user_id is required" {
		t.Fatalf("got %v", err)
	}
	if n := f.proxy.stats.byCode[codes.InvalidArgument].Load(); n != 1 {
		t.Fatalf("INVALID_ARGUMENT counted %d times", n)
	}
}

func TestCallsBeyondTheLimitAreRefusedAtOnceWithoutReachingTheBackend(t *testing.T) {
	for _, mode := range []string{"--classify-stream=true", "--classify-stream=false"} {
		t.Run(mode, func(t *testing.T) { refusedAtTheLimit(t, start(t, 2, mode)) })
	}
}

func refusedAtTheLimit(t *testing.T, f *fixture) {
	results := make(chan error, 2)
	for _, user := range []string{"held-1", "held-2"} {
		go func() { _, err := classify(f, context.Background(), user); results <- err }()
	}
	for range 2 {
		<-f.backend.entered // both held inside the backend: the limit is reached
	}
	began := time.Now()
	_, err := classify(f, context.Background(), "over-the-limit")
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "--max-in-flight") {
		t.Fatalf("got %v", err)
	}
	if elapsed := time.Since(began); elapsed > 2*time.Second {
		t.Fatalf("refusal took %v", elapsed)
	}
	close(f.backend.release)
	for range 2 {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
	if _, err := classify(f, context.Background(), "after"); err != nil { // capacity is back
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for range 3 {
		seen[<-f.backend.received] = true
	}
	if seen["over-the-limit"] || !seen["after"] {
		t.Fatalf("backend received %v", seen)
	}
	if f.proxy.stats.refused.Load() != 1 || f.proxy.stats.byCode[codes.OK].Load() != 3 || f.proxy.inFlight.Load() != 0 {
		t.Fatalf("refused %d, OK %d, in flight %d", f.proxy.stats.refused.Load(), f.proxy.stats.byCode[codes.OK].Load(), f.proxy.inFlight.Load())
	}
	recorder := httptest.NewRecorder()
	f.proxy.metricsHandler(recorder, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range []string{"snaplearn_gateway_refused_total 1", `snaplearn_gateway_requests_total{code="OK"} 3`, "snaplearn_gateway_max_in_flight 2", "snaplearn_gateway_in_flight 0",
		// The three forwarded calls are timed, the refused one is not.
		"snaplearn_gateway_request_seconds_count 3", "snaplearn_gateway_backend_seconds_count 3",
		"snaplearn_gateway_own_seconds_count 3"} {
		if !strings.Contains(recorder.Body.String(), line+"\n") {
			t.Fatalf("metrics lack %q:\n%s", line, recorder.Body.String())
		}
	}
}

func TestAtTheLimitTheTapRefusesAdmittedMethodsOnlyAndReservesNothing(t *testing.T) {
	f := start(t, 2)
	classifyInfo := &tap.Info{FullMethodName: classifyMethod}
	if _, err := f.proxy.refuseEarly(context.Background(), classifyInfo); err != nil {
		t.Fatalf("below the limit: %v", err)
	}
	if f.proxy.inFlight.Load() != 0 || f.proxy.stats.refused.Load() != 0 {
		t.Fatalf("the tap reserved or counted: in flight %d, refused %d", f.proxy.inFlight.Load(), f.proxy.stats.refused.Load())
	}
	f.proxy.inFlight.Store(2) // as if two calls were being served
	_, err := f.proxy.refuseEarly(context.Background(), classifyInfo)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "--max-in-flight") {
		t.Fatalf("at the limit: %v", err)
	}
	health := &tap.Info{FullMethodName: "/grpc.health.v1.Health/Check"}
	if _, err := f.proxy.refuseEarly(context.Background(), health); err != nil {
		t.Fatalf("a method outside the limit was refused: %v", err)
	}
	if f.proxy.stats.refused.Load() != 1 {
		t.Fatalf("refused %d, want 1", f.proxy.stats.refused.Load())
	}
	f.proxy.inFlight.Store(0)
}

func TestTheCallersDeadlineReachesTheBackend(t *testing.T) {
	for _, mode := range []string{"--classify-stream=true", "--classify-stream=false"} {
		t.Run(mode, func(t *testing.T) { deadlineReachesTheBackend(t, start(t, 8, mode)) })
	}
}

func deadlineReachesTheBackend(t *testing.T, f *fixture) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := classify(f, ctx, "held-until-deadline")
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v", err)
	}
	backendCtx := <-f.backend.entered
	if _, ok := backendCtx.Deadline(); !ok {
		t.Fatal("the backend's call had no deadline")
	}
	select {
	case <-backendCtx.Done(): // the backend's call ended with the caller's
	case <-time.After(5 * time.Second):
		t.Fatal("the backend's call outlived the caller's deadline")
	}
}

func TestHealthIsForwardedIncludingItsStream(t *testing.T) {
	f := start(t, 8)
	healthClient := healthpb.NewHealthClient(f.conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := healthClient.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || reply.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("check: %v %v", reply, err)
	}
	watch, err := healthClient.Watch(ctx, &healthpb.HealthCheckRequest{Service: "snaplearn.vision.v1.VisionService"})
	if err != nil {
		t.Fatal(err)
	}
	f.health.SetServingStatus("snaplearn.vision.v1.VisionService", healthpb.HealthCheckResponse_SERVING)
	for want := healthpb.HealthCheckResponse_SERVING; ; {
		update, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if update.GetStatus() != want {
			continue // SERVICE_UNKNOWN before the status was set
		}
		if want == healthpb.HealthCheckResponse_NOT_SERVING {
			break
		}
		want = healthpb.HealthCheckResponse_NOT_SERVING
		f.health.SetServingStatus("snaplearn.vision.v1.VisionService", want)
	}
	if f.proxy.stats.byCode[codes.OK].Load() != 0 {
		t.Fatal("health calls were counted as inference calls")
	}
}

func TestFlagsAreValidated(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"--backend", "x:1", "--max-in-flight", "0"},
		{"--backend", "x:1", "--backend-connections", "0"},
		{"--backend", "x:1", "--port", "70000"},
		{"--backend", "x:1", "--admit", "Classify"},
		{"--backend", "x:1", "extra"},
		{"--backend", "x:1", "--stream-max-age", "0"},
		{"--backend", "x:1", "--gc-percent", "-1"},
	} {
		if _, err := parseArgs(args, io.Discard); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
	o, err := parseArgs([]string{"--backend", "a:1, b:2", "--admit", "/p.S/M"}, io.Discard)
	if err != nil || len(o.backends) != 2 || o.backends[1] != "b:2" || len(o.admitted) != 1 {
		t.Fatalf("%+v %v", o, err)
	}
}

func TestTheGCTargetIs400UnlessGOGCTheFlagOrItsVariableSetsIt(t *testing.T) {
	gcPercent := func(args ...string) int {
		t.Helper()
		o, err := parseArgs(append([]string{"--backend", "x:1"}, args...), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		return o.gcPercent
	}
	t.Setenv("GOGC", "")
	if got := gcPercent(); got != 400 {
		t.Errorf("default: %d, want 400", got)
	}
	if got := gcPercent("--gc-percent", "0"); got != 0 {
		t.Errorf("--gc-percent 0: %d, want 0 (Go's own)", got)
	}
	t.Setenv("GOGC", "150")
	if got := gcPercent(); got != 0 {
		t.Errorf("with GOGC set: %d, want 0 (GOGC left alone)", got)
	}
	if got := gcPercent("--gc-percent", "300"); got != 300 {
		t.Errorf("--gc-percent 300 with GOGC set: %d", got)
	}
	t.Setenv("SNAPLEARN_GATEWAY_GC_PERCENT", "250")
	if got := gcPercent(); got != 250 {
		t.Errorf("SNAPLEARN_GATEWAY_GC_PERCENT=250: %d", got)
	}
}

func TestTheGCTargetIsAppliedOnlyWhenSet(t *testing.T) {
	previous := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(previous) })
	applyGCTarget(0)
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("0 changed Go's GC target to %d", got)
	}
	applyGCTarget(400)
	if got := debug.SetGCPercent(100); got != 400 {
		t.Errorf("GC target after applyGCTarget(400): %d", got)
	}
}
